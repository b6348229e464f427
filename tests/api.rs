//! The OCI read API through Kura against a real Distribution upstream:
//! headers, byte-exact pass-through, Range, listings, error codes, and what
//! reaches the upstream.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use support::images::sha256_digest;
use support::{Kura, KuraOptions, PushedImage, Upstream, seed_all, seed_large};

fn client() -> reqwest::Client {
    support::net::http_client(Duration::from_secs(120))
}

async fn get(kura: &Kura, path: &str) -> reqwest::Response {
    kura.get(path).await
}

async fn head(kura: &Kura, path: &str) -> reqwest::Response {
    client()
        .head(format!("{}{path}", kura.url()))
        .send()
        .await
        .unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// Reads a body to the end, hashing it; an aborted transfer is an error.
async fn body_digest(response: reqwest::Response) -> Result<(String, u64), reqwest::Error> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), len))
}

/// A GET sent byte-for-byte, because URL parsers (reqwest's included)
/// resolve `..` and `%2e%2e` before sending. Returns status and body.
async fn raw_get(kura: &Kura, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(kura.addr()).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: kura\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["errors"][0]["code"].as_str().unwrap().to_owned()
}

async fn assert_manifest(
    kura: &Kura,
    repository: &str,
    reference: &str,
    digest: &str,
    media_type: &str,
) {
    let path = format!("/v2/{repository}/manifests/{reference}");
    let response = get(kura, &path).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    assert_eq!(header(&response, "content-type"), media_type, "{path}");
    assert_eq!(header(&response, "docker-content-digest"), digest, "{path}");
    let bytes = response.bytes().await.unwrap();
    assert_eq!(
        sha256_digest(&bytes),
        digest,
        "{path}: bytes differ from upstream's"
    );

    let response = head(kura, &path).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-length"), bytes.len().to_string());
    assert_eq!(header(&response, "docker-content-digest"), digest);
}

async fn assert_image_blobs(kura: &Kura, image: &PushedImage) {
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let response = get(
            kura,
            &format!("/v2/{}/blobs/{}", image.repository, blob.digest),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "docker-content-digest"), blob.digest);
        assert_eq!(header(&response, "content-length"), blob.size.to_string());
        assert_eq!(
            body_digest(response).await.unwrap(),
            (blob.digest.clone(), blob.size)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_manifest_type_and_blob_passes_through_byte_for_byte() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;

    let base = get(&kura, "/v2/").await;
    assert_eq!(base.status(), StatusCode::OK);
    assert_eq!(
        header(&base, "docker-distribution-api-version"),
        "registry/2.0"
    );

    let image = &seeded.multilayer;
    assert_manifest(
        &kura,
        &image.repository,
        "latest",
        &image.digest,
        &image.media_type,
    )
    .await;
    assert_manifest(
        &kura,
        &image.repository,
        &image.digest,
        &image.digest,
        &image.media_type,
    )
    .await;
    assert_image_blobs(&kura, image).await;
    for index in [&seeded.oci_index, &seeded.docker_list] {
        assert_manifest(
            &kura,
            &index.repository,
            &index.tag,
            &index.digest,
            &index.media_type,
        )
        .await;
        for child in &index.manifests {
            assert_manifest(
                &kura,
                &child.repository,
                &child.digest,
                &child.digest,
                &child.media_type,
            )
            .await;
            assert_image_blobs(&kura, child).await;
        }
    }

    let catalog: serde_json::Value = get(&kura, "/v2/_catalog").await.json().await.unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!([
            "library/multilayer",
            "multiarch/dockerlist",
            "multiarch/oci"
        ])
    );
    let page = get(&kura, "/v2/_catalog?n=2").await;
    assert_eq!(
        header(&page, "link"),
        "</v2/_catalog?n=2&last=multiarch%2Fdockerlist>; rel=\"next\""
    );
    let page: serde_json::Value = page.json().await.unwrap();
    assert_eq!(
        page["repositories"],
        serde_json::json!(["library/multilayer", "multiarch/dockerlist"])
    );
    let rest = get(&kura, "/v2/_catalog?n=2&last=multiarch%2Fdockerlist").await;
    assert!(rest.headers().get("link").is_none());
    let rest: serde_json::Value = rest.json().await.unwrap();
    assert_eq!(rest["repositories"], serde_json::json!(["multiarch/oci"]));

    let tags: serde_json::Value = get(&kura, "/v2/library/multilayer/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        tags,
        serde_json::json!({"name": "library/multilayer", "tags": ["latest"]})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn range_requests_get_206_and_416() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let image = &seeded.multilayer;
    let layer = &image.layers[0];
    let path = format!("/v2/{}/blobs/{}", image.repository, layer.digest);
    let full = get(&kura, &path).await.bytes().await.unwrap();

    for warmth in ["cached", "cached again"] {
        let response = client()
            .get(format!("{}{path}", kura.url()))
            .header("range", "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT, "{warmth}");
        assert_eq!(
            header(&response, "content-range"),
            format!("bytes 10-19/{}", layer.size)
        );
        assert_eq!(response.bytes().await.unwrap(), full.slice(10..20));
    }
    let response = client()
        .get(format!("{}{path}", kura.url()))
        .header("range", format!("bytes={}-", layer.size))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(&response, "content-range"),
        format!("bytes */{}", layer.size)
    );
}

/// Zero-length blobs exist (some artifacts have empty layers or configs);
/// nothing in the download path may assume at least one byte.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_blob_is_cached_and_served() {
    let upstream = Upstream::anonymous().await;
    let digest = upstream
        .client()
        .push_blob("empty/blob", bytes::Bytes::new())
        .await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let path = format!("/v2/empty/blob/blobs/{digest}");
    for warmth in ["cold", "cached"] {
        let response = get(&kura, &path).await;
        assert_eq!(response.status(), StatusCode::OK, "{warmth}");
        assert_eq!(header(&response, "docker-content-digest"), digest);
        assert_eq!(header(&response, "content-length"), "0");
        assert!(response.bytes().await.unwrap().is_empty(), "{warmth}");
    }
    let response = head(&kura, &path).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-length"), "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_is_fetched_from_upstream_once_even_by_concurrent_clients() {
    let upstream = Upstream::anonymous().await;
    let image = seed_large(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let big = image.layers.iter().max_by_key(|b| b.size).unwrap().clone();
    assert!(big.size >= 256 << 20);
    let path = format!("/v2/{}/blobs/{}", image.repository, big.digest);

    // A HEAD of the uncached blob answers its size without downloading it.
    let bytes_before = upstream.bytes_served();
    let response = head(&kura, &path).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-length"), big.size.to_string());
    assert_eq!(upstream.count_requests("GET", &big.digest), 0);
    assert!(
        upstream.bytes_served() - bytes_before < 64 * 1024,
        "HEAD moved blob bytes"
    );

    // 16 clients at once, some joining while the download is under way.
    let clients = (0..16).map(|i| {
        let url = format!("{}{path}", kura.url());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20 * i)).await;
            body_digest(client().get(url).send().await.unwrap())
                .await
                .unwrap()
        })
    });
    for result in futures_util::future::join_all(clients).await {
        assert_eq!(result.unwrap(), (big.digest.clone(), big.size));
    }
    assert_eq!(
        upstream.count_requests("GET", &big.digest),
        1,
        "upstream served the blob more than once"
    );
    let served = upstream.bytes_served() - bytes_before;
    assert!(
        served < big.size + big.size / 20,
        "upstream sent {served} bytes for a {} byte blob",
        big.size
    );

    // Warm: from disk, no upstream traffic.
    assert_eq!(
        body_digest(get(&kura, &path).await).await.unwrap(),
        (big.digest.clone(), big.size)
    );
    assert_eq!(upstream.count_requests("GET", &big.digest), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_are_served_from_cache_within_tagttl_then_revalidated_with_one_head() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let mut options = KuraOptions::for_upstream(&upstream);
    options
        .extra_env
        .push(("REGISTRY_PROXY_TAGTTL".into(), "2s".into()));
    let kura = Kura::start(options).await;
    let image = &seeded.multilayer;
    let path = format!("/v2/{}/manifests/latest", image.repository);
    let manifest_path = format!("/v2/{}/manifests/latest", image.repository);

    assert_eq!(get(&kura, &path).await.status(), StatusCode::OK);
    let gets = upstream.count_requests("GET", &manifest_path);
    let heads = upstream.count_requests("HEAD", &manifest_path);
    for _ in 0..20 {
        assert_eq!(get(&kura, &path).await.status(), StatusCode::OK);
    }
    assert_eq!(
        upstream.count_requests("GET", &manifest_path),
        gets,
        "within tagttl: no upstream GET"
    );
    assert_eq!(
        upstream.count_requests("HEAD", &manifest_path),
        heads,
        "within tagttl: no upstream HEAD"
    );

    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..5 {
        assert_eq!(get(&kura, &path).await.status(), StatusCode::OK);
    }
    assert_eq!(
        upstream.count_requests("HEAD", &manifest_path),
        heads + 1,
        "after tagttl: exactly one HEAD"
    );
    assert_eq!(
        upstream.count_requests("GET", &manifest_path),
        gets,
        "unchanged digest: no GET"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_upstream_still_gets_cached_content_served() {
    let mut upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let mut options = KuraOptions::for_upstream(&upstream);
    options
        .extra_env
        .push(("REGISTRY_PROXY_TAGTTL".into(), "0".into()));
    let kura = Kura::start(options).await;
    let image = &seeded.multilayer;
    let tag_path = format!("/v2/{}/manifests/latest", image.repository);
    let digest_path = format!("/v2/{}/manifests/{}", image.repository, image.digest);
    let uncached = format!("/v2/{}/manifests/latest", seeded.oci_index.repository);
    assert_eq!(get(&kura, &tag_path).await.status(), StatusCode::OK);
    assert_eq!(get(&kura, &digest_path).await.status(), StatusCode::OK);

    // Hung (SIGSTOP): the cached tag is answered within the timeout.
    upstream.pause();
    let started = Instant::now();
    let response = get(&kura, &tag_path).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "warning").starts_with("110 "));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(get(&kura, &digest_path).await.status(), StatusCode::OK);
    let started = Instant::now();
    let response = get(&kura, &uncached).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(error_code(response).await, "UNAVAILABLE");
    upstream.resume();

    // Gone: same answers, and the tag list falls back to cached tags.
    upstream.stop();
    let response = get(&kura, &tag_path).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        sha256_digest(&response.bytes().await.unwrap()),
        image.digest,
        "stale manifest bytes are the cached ones"
    );
    assert_eq!(
        get(&kura, &uncached).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let tags: serde_json::Value = get(&kura, &format!("/v2/{}/tags/list", image.repository))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["latest"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_oci_errors_and_touches_nothing() {
    let upstream = Upstream::anonymous().await;
    seed_all(&upstream).await;
    let sandbox = tempfile::tempdir().unwrap();
    let cache_dir = sandbox.path().join("cache");
    let mut options = KuraOptions::for_upstream(&upstream);
    options.cache_dir = Some(cache_dir.clone());
    let kura = Kura::start(options).await;
    let good = "sha256:".to_owned() + &"0".repeat(64);

    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "/v2/../etc/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a/..%2F..%2Fetc/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/%2e%2e/%2e%2e/tmp/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a/%2e%2e/blobs/".to_owned() + &good,
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/UPPER/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        // No manifest can have a reference that is not a tag or a digest:
        // 404, as Distribution and the conformance tests say; blob paths
        // answer 400 for a malformed digest.
        (
            "/v2/library/multilayer/manifests/sha256:totallywrong".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/multilayer/manifests/.INVALID_MANIFEST_NAME".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/multilayer/manifests/sha512:".to_owned() + &"0".repeat(128),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/multilayer/blobs/sha256:..%2F..%2Fx".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/multilayer/blobs/notadigest".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/multilayer/blobs/md5:abc".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/multilayer/manifests/..".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/multilayer/manifests/%2e%2e".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/multilayer/manifests/nosuchtag".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        // Distribution itself says MANIFEST_UNKNOWN here, and NAME_UNKNOWN for the tag list.
        (
            "/v2/no/such/repo/manifests/latest".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/no/such/repo/tags/list".into(),
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/library/multilayer/blobs/".to_owned() + &good,
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            "/v2/_catalog?n=minus".into(),
            StatusCode::BAD_REQUEST,
            "PAGINATION_NUMBER_INVALID",
        ),
    ];
    for (path, status, code) in &cases {
        let (actual, body) = raw_get(&kura, path).await;
        assert_eq!(actual, status.as_u16(), "{path}: {body}");
        let body: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert_eq!(body["errors"][0]["code"], *code, "{path}");
    }
    for method in [
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::POST,
        reqwest::Method::PATCH,
    ] {
        for path in [
            "/v2/library/multilayer/manifests/latest",
            "/v2/library/multilayer/blobs/uploads/",
        ] {
            let response = client()
                .request(method.clone(), format!("{}{path}", kura.url()))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(error_code(response).await, "UNSUPPORTED");
        }
    }

    // Impossible references are answered without asking the upstream.
    for impossible in ["INVALID_MANIFEST_NAME", "totallywrong", "sha512:", "/.."] {
        let asked = upstream.count_requests("GET", impossible)
            + upstream.count_requests("HEAD", impossible);
        assert_eq!(asked, 0, "{impossible} reached the upstream");
    }
    // Nothing was written outside the storage root, nothing cached, still serving.
    let entries: Vec<_> = std::fs::read_dir(sandbox.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("cache")]);
    let catalog: serde_json::Value = get(&kura, "/v2/_catalog").await.json().await.unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!([]));
    assert_eq!(get(&kura, "/v2/").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_for_one_cold_tag_share_one_upstream_request() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let image = &seeded.multilayer;
    let path = format!("/v2/{}/manifests/latest", image.repository);

    let requests = (0..16).map(|_| {
        let url = format!("{}{path}", kura.url());
        tokio::spawn(async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        })
    });
    for body in futures_util::future::join_all(requests).await {
        assert_eq!(sha256_digest(&body.unwrap()), image.digest);
    }
    let upstream_calls =
        upstream.count_requests("GET", &path) + upstream.count_requests("HEAD", &path);
    assert!(
        upstream_calls <= 2,
        "16 cold requests made {upstream_calls} upstream manifest requests"
    );
    let metrics = kura.metrics_text().await;
    assert!(
        metrics.contains("kura_coalesced_waiters_total"),
        "{metrics}"
    );
}

/// `kura_catalog_listings_total`: how often Kura listed every repository.
async fn catalog_listings(kura: &Kura) -> String {
    let metrics = get(kura, "/metrics").await.text().await.unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("kura_catalog_listings_total "))
        .unwrap_or("0")
        .to_owned()
}

async fn catalog_repositories(kura: &Kura) -> serde_json::Value {
    let catalog: serde_json::Value = get(kura, "/v2/_catalog").await.json().await.unwrap();
    catalog["repositories"].clone()
}

/// Concurrent `_catalog` requests share one listing of storage, later
/// ones are answered from memory, and a repository pulled meanwhile shows
/// at once.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_catalog_requests_list_storage_once_and_new_repositories_show_at_once() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    assert!(kura.pull(&seeded.multilayer).await);

    let requests = (0..200).map(|_| catalog_repositories(&kura));
    let answers = futures_util::future::join_all(requests).await;
    for answer in answers {
        assert_eq!(answer, serde_json::json!(["library/multilayer"]));
    }
    let listed = catalog_listings(&kura).await;
    assert!(
        listed == "1" || listed == "2",
        "one listing at startup, at most one more for 200 requests: {listed}"
    );

    let newcomer = get(&kura, "/v2/multiarch/oci/manifests/latest").await;
    assert_eq!(newcomer.status(), StatusCode::OK);
    assert_eq!(
        catalog_repositories(&kura).await,
        serde_json::json!(["library/multilayer", "multiarch/oci"])
    );
    assert_eq!(catalog_listings(&kura).await, listed, "listed again");
}
