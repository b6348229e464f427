//! One Kura in front of two real registries (one anonymous, one with
//! htpasswd) that hold a repository of the same name with different
//! content: containerd routes by `?ns=`, podman by a mirror path prefix.

mod support;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::clients::{Containerd, ctr_pull_via, podman_pull_via};
use support::images::{Flavor, ImageBuild};
use support::{Kura, KuraOptions, Platform, PushedImage, Upstream};

const REGISTRY_A: &str = "registry-a.test";
const REGISTRY_B: &str = "registry-b.test";
const REPOSITORY: &str = "shared/app";

async fn push_distinct_image(upstream: &Upstream, label: &str) -> PushedImage {
    ImageBuild::synthetic(Flavor::Oci, Platform::linux("amd64", None), label, 2)
        .push(&upstream.client(), REPOSITORY, Some("latest"))
        .await
}

/// Counts TCP connections to a port, to prove nothing dials it.
struct ConnectionCounter {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl ConnectionCounter {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for connection in listener.incoming() {
                if connection.is_ok() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { port, accepted }
    }
}

fn kura_config(a: &Upstream, b: &Upstream, password_file: &std::path::Path) -> String {
    let (user, _) = b.credentials().expect("B uses htpasswd");
    format!(
        "version: 0.1\nupstreams:\n  - name: {REGISTRY_A}\n    remoteurl: {}\n  - name: {REGISTRY_B}\n    \
         remoteurl: {}\n    username: {user}\n    passwordfile: {}\n",
        a.url(),
        b.url(),
        password_file.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_kura_serves_two_registries_by_ns_and_by_path() {
    let a = Upstream::anonymous().await;
    let b = Upstream::htpasswd("puller", "routing-secret").await;
    let image_a = push_distinct_image(&a, "from registry A").await;
    let image_b = push_distinct_image(&b, "from registry B").await;
    assert_ne!(image_a.digest, image_b.digest);

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("b-password");
    std::fs::write(&password_file, "routing-secret\n").unwrap();
    let config = dir.path().join("kura.yml");
    std::fs::write(&config, kura_config(&a, &b, &password_file)).unwrap();
    let mut options = KuraOptions::new("http://127.0.0.1:1");
    options.extra_args.push(config.display().to_string());
    let kura = Kura::start(options).await;
    let reference = format!("{REPOSITORY}:latest");

    // containerd: ?ns=<registry>
    let containerd = Containerd::start();
    for (registry, image) in [(REGISTRY_A, &image_a), (REGISTRY_B, &image_b)] {
        let pulled = ctr_pull_via(&containerd, registry, &kura.addr().to_string(), &reference);
        assert_eq!(pulled.target_digest, image.digest, "ctr via ns={registry}");
        assert!(pulled.content_digests.is_superset(&image.all_digests()));
    }

    // podman: mirror location with the registry as a path prefix.
    for (registry, image) in [(REGISTRY_A, &image_a), (REGISTRY_B, &image_b)] {
        let location = format!("{}/{registry}", kura.addr());
        let pulled = podman_pull_via(registry, &location, &reference);
        assert_eq!(pulled.digest, image.digest, "podman via {location}");
        assert_eq!(pulled.diff_ids, image.diff_ids);
    }

    let http = support::net::http_client(Duration::from_secs(10));
    let response = http
        .get(format!(
            "{}/v2/{REPOSITORY}/manifests/latest?ns={REGISTRY_A}",
            kura.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["oci-namespace"], REGISTRY_A);

    // A registry that is not configured: 404 NAME_UNKNOWN, and nobody dials it.
    let counter = ConnectionCounter::start();
    let unconfigured = format!("127.0.0.1:{}", counter.port);
    for url in [
        format!(
            "{}/v2/{REPOSITORY}/manifests/latest?ns={unconfigured}",
            kura.url()
        ),
        format!(
            "{}/v2/{unconfigured}/{REPOSITORY}/manifests/latest",
            kura.url()
        ),
        format!(
            "{}/v2/evil.example/{REPOSITORY}/blobs/{}",
            kura.url(),
            image_a.config.digest
        ),
    ] {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 404, "{url}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{url}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("not configured")
        );
    }
    assert_eq!(
        counter.accepted.load(Ordering::SeqCst),
        0,
        "Kura dialled a registry named by a client"
    );

    assert_eq!(
        kura.catalog().await,
        vec![
            format!("{REGISTRY_A}/{REPOSITORY}"),
            format!("{REGISTRY_B}/{REPOSITORY}")
        ]
    );
    let tags = kura
        .get_json(&format!("/v2/{REGISTRY_B}/{REPOSITORY}/tags/list"))
        .await;
    assert_eq!(
        tags,
        serde_json::json!({"name": format!("{REGISTRY_B}/{REPOSITORY}"), "tags": ["latest"]})
    );
    assert!(!kura.log_text().contains("routing-secret"));
}
