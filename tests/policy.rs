//! Content policy and immutable tags against a real Distribution 2.8
//! upstream: what the policy refuses is 403 `DENIED` (manifests by tag and
//! digest, blobs, tag lists, referrers, `kura warm`) and never reaches the
//! upstream, counted in its access log; tightening the policy in the file
//! closes what was cached before, without a restart; an immutable tag keeps its digest past `tagttl` with
//! no upstream request while a mutable one follows the upstream.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::images::{Flavor, ImageBuild};
use support::process::run_tool;
use support::{Kura, KuraOptions, Platform, PushedImage, Upstream, skopeo_copy};

const POLICY_MESSAGE: &str = "not allowed by this cache's policy";

async fn push(upstream: &Upstream, label: &str, repository: &str, tags: &[&str]) -> PushedImage {
    let build = ImageBuild::synthetic(Flavor::Oci, Platform::linux("amd64", None), label, 1);
    let mut pushed = None;
    for tag in tags {
        pushed = Some(build.push(&upstream.client(), repository, Some(tag)).await);
    }
    pushed.expect("at least one tag")
}

/// A config file for `upstream` with `policy` (YAML lines at `proxy.policy`
/// indentation) and `extra` proxy keys.
fn write_config(path: &Path, upstream: &Upstream, policy: &str, extra: &str) {
    let text = format!(
        "version: 0.1\nproxy:\n  remoteurl: {}\n{extra}  policy:\n{policy}",
        upstream.url()
    );
    std::fs::write(path, text).unwrap();
}

async fn start_kura(upstream: &Upstream, config: &Path) -> Kura {
    let mut options = KuraOptions::for_upstream(upstream);
    options.extra_args.push(config.display().to_string());
    Kura::start(options).await
}

/// Asserts a 403 `DENIED` that says it is the cache's policy and names no
/// other repository.
async fn assert_refused(response: reqwest::Response, what: &str, unnamed: &str) {
    assert_eq!(response.status(), 403, "{what}");
    let body: serde_json::Value = response.json().await.unwrap();
    let error = &body["errors"][0];
    assert_eq!(error["code"], "DENIED", "{what}: {body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(POLICY_MESSAGE), "{what}: {message}");
    assert!(!message.contains(unnamed), "{what}: {message}");
}

fn http() -> reqwest::Client {
    support::net::http_client(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_content_never_reaches_the_upstream() {
    let upstream = Upstream::anonymous().await;
    let public = push(&upstream, "public", "public/app", &["v1", "dev"]).await;
    let private = push(&upstream, "private", "private/app", &["v1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kura.yml");
    let policy =
        "    allow: [\"public/*\", \"private/*\"]\n    deny: [\"private/*\"]\n    tags: [\"v*\"]\n";
    write_config(&config, &upstream, policy, "");
    let kura = start_kura(&upstream, &config).await;
    let before = upstream.requests().len();

    let private_blob = &private.config.digest;
    let refused = [
        ("GET", "/v2/private/app/manifests/v1".to_owned()),
        ("HEAD", "/v2/private/app/manifests/v1".to_owned()),
        (
            "GET",
            format!("/v2/private/app/manifests/{}", private.digest),
        ),
        ("GET", format!("/v2/private/app/blobs/{private_blob}")),
        ("HEAD", format!("/v2/private/app/blobs/{private_blob}")),
        ("GET", "/v2/private/app/tags/list".to_owned()),
        (
            "GET",
            format!("/v2/private/app/referrers/{}", private.digest),
        ),
        // Outside `tags`, in an allowed repository.
        ("GET", "/v2/public/app/manifests/dev".to_owned()),
    ];
    for (method, path) in &refused {
        let url = format!("{}{path}", kura.url());
        let response = match *method {
            "HEAD" => http().head(&url).send().await.unwrap(),
            _ => http().get(&url).send().await.unwrap(),
        };
        if *method == "HEAD" {
            assert_eq!(response.status(), 403, "HEAD {path}");
        } else {
            assert_refused(response, path, "public/app").await;
        }
    }
    let response = kura.get("/v2/public/app/manifests/dev").await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["errors"][0]["message"],
        "tag not allowed by this cache's policy"
    );
    assert_eq!(
        upstream.requests().len(),
        before,
        "a refused request reached the upstream: {:?}",
        &upstream.requests()[before..]
    );

    // The allowed repository and tag pull with a real client, and its tag
    // list shows only what the policy lets a client resolve.
    let landed = skopeo_copy(kura.addr(), "public/app:v1", &dir.path().join("oci"), false);
    assert_eq!(landed.top_digest, public.digest);
    assert!(landed.digests.is_superset(&public.all_digests()));
    let tags = kura.get_json("/v2/public/app/tags/list").await;
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
    let catalog = kura.get_json("/v2/_catalog").await;
    assert_eq!(catalog["repositories"], serde_json::json!(["public/app"]));

    // Tightening the policy in the file closes what is already cached,
    // upstream or not, without a restart, and `_catalog` no longer names it.
    let tightened = "    deny: [\"public/**\"]\n";
    write_config(&config, &upstream, tightened, "");
    let manifest = "/v2/public/app/manifests/v1";
    let mut status = 200;
    for _ in 0..50 {
        status = kura.get(manifest).await.status().as_u16();
        if status == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status,
        403,
        "the tightened policy was not reloaded within 10 s\n{}",
        kura.log_text()
    );
    let before = upstream.requests().len();
    for path in [
        "/v2/public/app/manifests/v1".to_owned(),
        format!("/v2/public/app/manifests/{}", public.digest),
        format!("/v2/public/app/blobs/{}", public.config.digest),
    ] {
        assert_refused(kura.get(&path).await, &path, "private/app").await;
    }
    assert_eq!(upstream.requests().len(), before);
    let catalog = kura.get_json("/v2/_catalog").await;
    assert_eq!(catalog["repositories"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_of_a_denied_image_fails_and_fetches_nothing() {
    let upstream = Upstream::anonymous().await;
    let denied = push(&upstream, "denied", "team/secret", &["v1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kura.yml");
    write_config(&config, &upstream, "    deny: [\"team/secret\"]\n", "");
    let cache = dir.path().join("cache");
    let before = upstream.requests().len();

    let mut warm = Command::new(env!("CARGO_BIN_EXE_kura"));
    warm.arg("warm")
        .arg("--config")
        .arg(&config)
        .arg("--cache-dir")
        .arg(&cache)
        .arg(denied.reference());
    let output = run_tool(warm, Duration::from_secs(60));
    assert!(!output.success(), "warm of a denied image succeeded");
    assert!(
        output
            .stderr
            .contains("repository not allowed by this cache's policy"),
        "{}",
        output.stderr
    );
    assert_eq!(upstream.requests().len(), before, "warm asked the upstream");
    let stored = support::kura::blob_path(&cache, &denied.config.digest);
    assert!(!stored.exists(), "warm stored a denied blob");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_immutable_tag_keeps_its_digest_past_tagttl() {
    let upstream = Upstream::anonymous().await;
    let first = push(&upstream, "first", "base/image", &["3.0", "latest"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kura.yml");
    let policy = "    immutabletags: [\"3.*\"]\n";
    write_config(&config, &upstream, policy, "  tagttl: 1s\n");
    let kura = start_kura(&upstream, &config).await;
    let digest_of = |response: reqwest::Response| {
        assert_eq!(response.status(), 200);
        response.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    for tag in ["3.0", "latest"] {
        let path = format!("/v2/base/image/manifests/{tag}");
        assert_eq!(digest_of(kura.get(&path).await), first.digest, "{tag}");
    }

    // Both tags move upstream; tagttl runs out.
    let moved = push(&upstream, "moved", "base/image", &["3.0", "latest"]).await;
    assert_ne!(moved.digest, first.digest);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let before = upstream.requests().len();
    for _ in 0..3 {
        let pinned = kura.get("/v2/base/image/manifests/3.0").await;
        assert_eq!(digest_of(pinned), first.digest, "the immutable tag moved");
    }
    assert_eq!(
        upstream.requests().len(),
        before,
        "an immutable tag was revalidated: {:?}",
        &upstream.requests()[before..]
    );
    let mutable = kura.get("/v2/base/image/manifests/latest").await;
    assert_eq!(digest_of(mutable), moved.digest, "the mutable tag stayed");
    assert!(upstream.requests().len() > before);
}
