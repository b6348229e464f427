//! Validates the test-support library against real upstreams and clients, without Kura.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use support::images::{LARGE_LAYER_SIZE, large_image};
use support::net::http_client;
use support::upstream::{LoggedRequest, parse_access_line};
use support::*;

const USER: &str = "kura-user";
const PASS: &str = "kura-secret-pass";

fn set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

async fn status_of(url: &str) -> StatusCode {
    http_client(Duration::from_secs(5))
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
}

#[test]
fn access_log_lines_are_parsed() {
    let line = r#"127.0.0.1 - - [29/Nov/2026:06:47:51 +0000] "GET /v2/foo/manifests/bar?ns=x HTTP/1.1" 404 93 "" "curl/7.88.1""#;
    let expected = LoggedRequest {
        method: "GET".into(),
        uri: "/v2/foo/manifests/bar?ns=x".into(),
        status: 404,
    };
    assert_eq!(parse_access_line(line), Some(expected));
    let logrus = r#"time="x" level=info msg="response completed" http.request.method=GET"#;
    assert_eq!(parse_access_line(logrus), None);
}

#[test]
#[should_panic(expected = "required tool `kura-no-such-tool` is missing")]
fn missing_tool_panics() {
    require_tool("kura-no-such-tool");
}

#[tokio::test]
async fn skopeo_copies_every_seeded_image_from_anonymous_upstream() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let dest = tempfile::tempdir().unwrap();
    let addr = upstream.addr();

    let single = &seeded.multilayer;
    let landed = skopeo_copy(addr, &single.reference(), &dest.path().join("ml"), false);
    assert_eq!(landed.top_digest, single.digest);
    assert_eq!(landed.digests, single.all_digests());

    for index in [&seeded.oci_index, &seeded.docker_list] {
        let dir = dest.path().join(index.repository.replace('/', "_"));
        let landed = skopeo_copy(addr, &index.reference(), &dir, true);
        assert_eq!(landed.top_digest, index.digest, "{}", index.reference());
        assert_eq!(landed.digests, index.all_digests(), "{}", index.reference());
    }

    let amd64 = seeded.oci_index.child("amd64");
    let reference = seeded.oci_index.reference();
    let landed = skopeo_copy(addr, &reference, &dest.path().join("oci-amd64"), false);
    assert_eq!(landed.digests, amd64.all_digests());

    let manifest_path = format!("/v2/{}/manifests/latest", single.repository);
    assert!(upstream.count_requests("GET", &manifest_path) >= 1);
    let layer_path = format!("/blobs/{}", single.layers[0].digest);
    assert_eq!(upstream.count_requests("GET", &layer_path), 1);
    assert!(upstream.bytes_served() >= single.blob_bytes());
}

#[tokio::test]
async fn podman_pulls_through_the_mirror_setting() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;

    let single = &seeded.multilayer;
    let image = podman_pull(upstream.addr(), &single.reference());
    assert_eq!(image.digest, single.digest);
    assert_eq!(image.id, single.config.digest);
    assert_eq!(image.diff_ids, single.diff_ids);

    for index in [&seeded.oci_index, &seeded.docker_list] {
        let amd64 = index.child("amd64");
        let image = podman_pull(upstream.addr(), &index.reference());
        assert_eq!(image.digest, index.digest);
        assert_eq!(image.repo_digests, set([&index.digest, &amd64.digest]));
        assert_eq!(image.diff_ids, amd64.diff_ids);
    }
}

#[tokio::test]
async fn containerd_pulls_through_hosts_dir_mirror() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let containerd = Containerd::start();

    let single = &seeded.multilayer;
    let image = ctr_pull(&containerd, upstream.addr(), &single.reference());
    assert_eq!(image.target_digest, single.digest);
    assert_eq!(image.media_type, single.media_type);
    assert!(image.content_digests.is_superset(&single.all_digests()));

    for index in [&seeded.oci_index, &seeded.docker_list] {
        let image = ctr_pull(&containerd, upstream.addr(), &index.reference());
        assert_eq!(image.target_digest, index.digest);
        assert_eq!(image.media_type, index.media_type);
        let mut expected = index.child("amd64").all_digests();
        expected.insert(index.digest.clone());
        assert!(image.content_digests.is_superset(&expected));
    }
    assert!(upstream.count_requests("GET", "?ns=upstream.test") >= 3);
}

#[tokio::test]
async fn htpasswd_upstream_requires_and_accepts_basic_credentials() {
    let upstream = Upstream::htpasswd(USER, PASS).await;
    assert_eq!(
        status_of(&format!("{}/v2/", upstream.url())).await,
        StatusCode::UNAUTHORIZED
    );
    let seeded = seed_all(&upstream).await;

    let manifest = upstream
        .client()
        .get_manifest("multiarch/dockerlist", "latest")
        .await;
    assert_eq!(manifest.digest, seeded.docker_list.digest);
    assert_eq!(manifest.media_type, seeded.docker_list.media_type);

    let anonymous = RegistryClient::new(&upstream.url(), Auth::Anonymous);
    let response = anonymous
        .send(
            Method::GET,
            "library/multilayer",
            "manifests/latest",
            HeaderMap::new(),
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(upstream.count_requests("GET", "/v2/library/multilayer/manifests/latest") >= 1);
}

#[tokio::test]
async fn token_upstream_issues_bearer_tokens_for_seeding_and_pulling() {
    let upstream = Upstream::token(USER, PASS).await;
    let issuer = upstream
        .token_issuer()
        .expect("token variant has an issuer");
    let seeded = seed_all(&upstream).await;
    let issued_after_seeding = issuer.tokens_issued();
    assert!(
        issued_after_seeding >= 3,
        "one token per repository at least"
    );

    let manifest = upstream
        .client()
        .get_manifest("multiarch/oci", "latest")
        .await;
    assert_eq!(manifest.digest, seeded.oci_index.digest);
    assert_eq!(manifest.media_type, seeded.oci_index.media_type);
    let child = seeded.oci_index.child("arm64");
    let config = upstream
        .client()
        .get_blob("multiarch/oci", &child.config.digest)
        .await;
    assert_eq!(config.len() as u64, child.config.size);
    assert!(issuer.tokens_issued() > issued_after_seeding);

    assert_eq!(status_of(&issuer.realm()).await, StatusCode::UNAUTHORIZED);
    let wrong = RegistryClient::new(&upstream.url(), Auth::basic(USER, "wrong"));
    let response = wrong
        .send(
            Method::GET,
            "multiarch/oci",
            "manifests/latest",
            HeaderMap::new(),
            None,
        )
        .await;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "wrong password gets no token"
    );
    assert!(issuer.requests_denied() >= 2);
}

#[tokio::test]
async fn large_image_round_trips_and_bytes_are_counted() {
    let upstream = Upstream::anonymous().await;
    let pushed = seed_large(&upstream).await;
    assert_eq!(pushed.layers.len(), 2);
    assert!(pushed.layers[1].size > LARGE_LAYER_SIZE as u64);
    assert_eq!(
        pushed.digest,
        support::images::sha256_digest(&large_image().manifest)
    );

    let before = upstream.bytes_served();
    let dest = tempfile::tempdir().unwrap();
    let landed = skopeo_copy(upstream.addr(), &pushed.reference(), dest.path(), false);
    assert_eq!(landed.digests, pushed.all_digests());
    assert!(upstream.bytes_served() - before >= pushed.blob_bytes());
    let big = &pushed.layers[1].digest;
    assert_eq!(upstream.count_requests("GET", big), 1);
}

#[tokio::test]
async fn upstream_can_be_paused_resumed_and_stopped() {
    let mut upstream = Upstream::anonymous().await;
    let url = format!("{}/v2/", upstream.url());
    upstream.pause();
    let hung = http_client(Duration::from_millis(500))
        .get(&url)
        .send()
        .await;
    assert!(hung.is_err(), "a paused upstream must not answer");
    upstream.resume();
    wait_http_ok(&url, Duration::from_secs(10)).await;
    upstream.stop();
    let refused = http_client(Duration::from_secs(2)).get(&url).send().await;
    assert!(refused.unwrap_err().is_connect());
}
