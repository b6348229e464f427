//! Eviction under a size cap and a TTL, with a real upstream: least
//! recently used images go first, shared blobs live as long as any image
//! uses them, collection never breaks a pull in progress, and it never
//! reads layers (memory stays far below what the cache holds).

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::images::{Flavor, ImageBuild, Layer, OCI_LAYER_TAR, one_layer_image};
use support::process::{memory_bytes, reset_peak_memory};
use support::{Kura, KuraOptions, Platform, PushedImage, Upstream, seed_large};

fn client() -> reqwest::Client {
    support::net::http_client(Duration::from_secs(120))
}

fn stored_blobs(kura: &Kura) -> Vec<String> {
    let mut found = Vec::new();
    for prefix in std::fs::read_dir(kura.cache_dir().join("blobs/sha256"))
        .unwrap()
        .flatten()
    {
        for blob in std::fs::read_dir(prefix.path()).unwrap().flatten() {
            found.push(format!("sha256:{}", blob.file_name().to_string_lossy()));
        }
    }
    found
}

/// An image with one incompressible `size`-byte layer, plus `shared` if given.
async fn push_image(
    upstream: &Upstream,
    repo: &str,
    size: usize,
    seed: u8,
    shared: Option<&Layer>,
) -> PushedImage {
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[seed as usize % 4] ^ seed)
        .collect();
    let mut layers = vec![Layer::plain(data, OCI_LAYER_TAR)];
    layers.extend(shared.cloned());
    ImageBuild::new(Flavor::Oci, Platform::linux("amd64", None), layers)
        .push(&upstream.client(), repo, Some("latest"))
        .await
}

fn options(upstream: &Upstream, settings: &[(&str, &str)]) -> KuraOptions {
    let mut options = KuraOptions::for_upstream(upstream);
    for (key, value) in settings {
        options.extra_env.push((key.to_string(), value.to_string()));
    }
    options
}

/// The value of an unlabelled metric; 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_until<F: AsyncFn() -> bool>(what: &str, condition: F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_size_cap_evicts_least_recently_used_and_keeps_shared_blobs() {
    let mut upstream = Upstream::anonymous().await;
    let shared = Layer::plain(vec![7u8; 200_000], OCI_LAYER_TAR);
    let mib = 1 << 20;
    let oldest = push_image(&upstream, "cap/oldest", mib, 1, Some(&shared)).await;
    let older = push_image(&upstream, "cap/older", mib, 2, None).await;
    let newer = push_image(&upstream, "cap/newer", mib, 3, None).await;
    let newest = push_image(&upstream, "cap/newest", mib, 4, Some(&shared)).await;
    // Room for about two and a half images.
    let kura = Kura::start(options(
        &upstream,
        &[
            ("REGISTRY_CACHE_MAXSIZE", "2700KiB"),
            ("REGISTRY_CACHE_GCINTERVAL", "300ms"),
            ("REGISTRY_CACHE_GCGRACE", "0"),
        ],
    ))
    .await;
    for image in [&oldest, &older, &newer, &newest] {
        assert!(kura.pull(image).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until(
        "eviction of the two least recently used images",
        async || kura.catalog().await == vec!["cap/newer".to_owned(), "cap/newest".to_owned()],
    )
    .await;
    // Two 1 MiB layers went (with their configs and manifests).
    wait_until("the eviction metrics", async || {
        let metrics = kura.metrics_text().await;
        sample(&metrics, "kura_evicted_blobs_total") >= 4.0
            && sample(&metrics, "kura_evicted_bytes_total") >= (2 * mib) as f64
    })
    .await;

    // The kept images are served from cache alone, shared layer included.
    upstream.stop();
    assert!(kura.pull(&newest).await, "newest image not fully cached");
    assert!(kura.pull(&newer).await, "newer image not fully cached");
    assert!(
        !kura.pull(&oldest).await,
        "oldest image should have been evicted"
    );
    let blobs = stored_blobs(&kura);
    assert!(
        blobs.contains(&shared.blob.digest),
        "a blob shared with a kept image was evicted"
    );
    assert!(
        !blobs.contains(&older.layers[0].digest),
        "an evicted image's layer is still stored"
    );
    assert!(kura.log_text().contains("evicted unused content"));
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_expiry_removes_unused_content_and_keeps_content_in_use() {
    let upstream = Upstream::anonymous().await;
    let unused = push_image(&upstream, "ttl/unused", 100_000, 5, None).await;
    let used = push_image(&upstream, "ttl/used", 100_000, 6, None).await;
    let kura = Kura::start(options(
        &upstream,
        &[
            ("REGISTRY_PROXY_TTL", "2s"),
            ("REGISTRY_PROXY_TAGTTL", "1h"),
            ("REGISTRY_CACHE_GCINTERVAL", "300ms"),
            ("REGISTRY_CACHE_GCGRACE", "0"),
        ],
    ))
    .await;
    assert!(kura.pull(&unused).await);
    assert!(kura.pull(&used).await);
    // Keep using one image for longer than the TTL.
    for _ in 0..8 {
        assert!(kura.pull(&used).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    wait_until("expiry of the unused image", async || {
        kura.catalog().await == vec!["ttl/used".to_owned()]
    })
    .await;
    let blobs = stored_blobs(&kura);
    assert!(!blobs.contains(&unused.layers[0].digest));
    assert!(blobs.contains(&used.layers[0].digest));
}

#[tokio::test(flavor = "multi_thread")]
async fn collection_racing_a_large_pull_never_breaks_it() {
    let upstream = Upstream::anonymous().await;
    let large = seed_large(&upstream).await;
    // A cap far below the image and a collector running constantly.
    let kura = Kura::start(options(
        &upstream,
        &[
            ("REGISTRY_CACHE_MAXSIZE", "1MiB"),
            ("REGISTRY_CACHE_GCINTERVAL", "100ms"),
            ("REGISTRY_CACHE_GCGRACE", "0"),
        ],
    ))
    .await;
    let pulls = (0..4).map(|_| {
        let kura_url = kura.url();
        let image = large.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            use sha2::{Digest, Sha256};
            for blob in std::iter::once(&image.config).chain(&image.layers) {
                let url = format!("{kura_url}/v2/{}/blobs/{}", image.repository, blob.digest);
                let response = client().get(&url).send().await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let mut hasher = Sha256::new();
                let mut stream = response.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    hasher.update(chunk.expect("transfer cut by collection"));
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
                assert_eq!(
                    format!("sha256:{}", hex::encode(hasher.finalize())),
                    blob.digest
                );
            }
        })
    });
    for pull in futures_util::future::join_all(pulls).await {
        pull.unwrap();
    }
}

/// Issue 12, scenario 4: with a 300 MiB layer cached and a collection every
/// 5 s, Kura once read the layer whole into memory on every run. A
/// collection reads manifests only, so memory stays far below the layer.
#[tokio::test(flavor = "multi_thread")]
async fn collections_with_a_300_mib_layer_cached_never_read_it_into_memory() {
    const INTERVAL: Duration = Duration::from_secs(5);
    const COLLECTIONS: usize = 3;
    let mut upstream = Upstream::anonymous().await;
    let known = push_image(&upstream, "gc/known", 100_000, 8, None).await;
    let big = one_layer_image(300 << 20, 0x5EED_0300)
        .push(&upstream.client(), "gc/big", Some("latest"))
        .await;
    let kura = Kura::start(options(
        &upstream,
        &[
            ("REGISTRY_CACHE_GCINTERVAL", "5s"),
            ("RUST_LOG", "info,kura::server=debug"),
        ],
    ))
    .await;
    assert!(kura.pull(&known).await);
    assert!(kura.pull(&big).await);

    // Peak memory over the next collections, both sampled and as the
    // kernel's high-water mark (which no short spike escapes).
    let pid = kura.pid();
    reset_peak_memory(pid);
    let collections = || {
        kura.log_text()
            .matches("collection removed nothing")
            .count()
    };
    let before = collections();
    let deadline = Instant::now() + INTERVAL * (COLLECTIONS as u32 + 1);
    let mut peak = 0;
    while collections() < before + COLLECTIONS && Instant::now() < deadline {
        peak = peak.max(memory_bytes(pid, "VmRSS"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = peak.max(memory_bytes(pid, "VmHWM"));
    eprintln!(
        "peak resident memory during collections: {} MiB",
        peak >> 20
    );
    assert!(
        peak < 100 << 20,
        "Kura's resident memory peaked at {} MiB during collections",
        peak >> 20
    );
    assert!(
        collections() >= before + COLLECTIONS,
        "{COLLECTIONS} collections did not run in time:\n{}",
        kura.log_text()
    );

    // Nothing was lost, and the cache answers at once from what it holds.
    upstream.stop();
    assert!(kura.pull(&known).await, "known image no longer served");
    let prompt = support::net::http_client(Duration::from_secs(5));
    let layer = format!("{}/v2/gc/big/blobs/{}", kura.url(), big.layers[0].digest);
    let head = prompt
        .head(&layer)
        .send()
        .await
        .expect("HEAD the big layer");
    assert_eq!(head.status(), StatusCode::OK, "big layer no longer cached");
    let ready = prompt.get(format!("{}/readyz", kura.url())).send().await;
    assert_eq!(ready.expect("/readyz").status(), StatusCode::OK);
}
