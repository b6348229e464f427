//! What a crash or a failing disk leaves in the cache is never served: an
//! empty blob under a digest's name and a corrupt manifest are fetched
//! again from the upstream, and writes that only record what the cache
//! holds may fail without failing a request whose bytes are verified.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use support::images::sha256_digest;
use support::{Kura, KuraOptions, PushedImage, Upstream, seed_all};

fn client() -> reqwest::Client {
    support::net::http_client(Duration::from_secs(60))
}

fn blob_path(cache: &Path, digest: &str) -> PathBuf {
    let hex = &digest["sha256:".len()..];
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// GETs a manifest; its status and the digest of the body.
async fn manifest(kura: &Kura, image: &PushedImage, reference: &str) -> (StatusCode, String) {
    let url = format!(
        "{}/v2/{}/manifests/{reference}",
        kura.url(),
        image.repository
    );
    let response = client()
        .get(url)
        .header("Accept", &image.media_type)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, sha256_digest(&response.bytes().await.unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_blob_left_by_a_crash_is_fetched_again() {
    let upstream = Upstream::anonymous().await;
    let image = seed_all(&upstream).await.multilayer;
    let mut kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    assert!(kura.pull(&image).await);

    // What ext4 keeps of an unsynced rename after a power loss.
    kura.kill9();
    let layer = &image.layers[0];
    let path = blob_path(kura.cache_dir(), &layer.digest);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    kura.restart().await;

    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        image.repository,
        layer.digest
    );
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        layer.size.to_string()
    );
    assert!(kura.pull(&image).await, "the layer was not fetched again");
    // The pull was released once verified; the commit follows.
    let committed = support::net::poll_until(Duration::from_secs(10), || {
        std::fs::metadata(&path).is_ok_and(|m| m.len() == layer.size)
    })
    .await;
    assert!(committed, "the layer was stored again at its full size");
    assert!(kura.log_text().contains("impossible size"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_manifest_on_disk_is_fetched_again_and_never_served() {
    let mut upstream = Upstream::anonymous().await;
    let image = seed_all(&upstream).await.multilayer;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    assert!(kura.pull(&image).await);
    let path = blob_path(kura.cache_dir(), &image.digest);
    let corrupt = || {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    };

    corrupt();
    assert_eq!(
        manifest(&kura, &image, &image.digest).await,
        (StatusCode::OK, image.digest.clone())
    );
    corrupt();
    assert_eq!(
        manifest(&kura, &image, "latest").await,
        (StatusCode::OK, image.digest.clone())
    );
    assert!(kura.log_text().contains("does not match its digest"));

    // With no upstream to fetch from, corrupt bytes are still not served.
    corrupt();
    upstream.stop();
    let (status, _) = manifest(&kura, &image, &image.digest).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_manifest_is_served_when_storing_it_fails() {
    let upstream = Upstream::anonymous().await;
    let image = seed_all(&upstream).await.multilayer;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    // Every small write goes through staging: with a file in its place,
    // each one fails, as on a full or failing disk.
    let staging = kura.cache_dir().join("staging");
    std::fs::remove_dir_all(&staging).unwrap();
    std::fs::write(&staging, b"in the way").unwrap();

    for reference in ["latest", "latest", image.digest.as_str()] {
        assert_eq!(
            manifest(&kura, &image, reference).await,
            (StatusCode::OK, image.digest.clone()),
            "{reference}"
        );
    }
    assert!(kura.log_text().contains("cannot store manifest"));
    assert!(!blob_path(kura.cache_dir(), &image.digest).exists());
}
