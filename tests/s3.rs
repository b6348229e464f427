//! Kura on S3-compatible storage: replicas sharing one bucket form one
//! cache. The bucket is moto's server; the tests that matter most for
//! replicas (one copy stored, a cold pull not waiting for the upload, a
//! warm `Range` read from the bucket, an upload surviving a bucket outage)
//! also run on s3s-fs, a second, independent S3 implementation.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::clients::skopeo_copy;
use support::images::sha256_digest;
use support::s3::{S3Impl, S3Server};
use support::{Kura, KuraOptions, Upstream, seed_all};
use tempfile::TempDir;

/// A Kura replica whose cache is the bucket; its local dir only stages.
async fn replica(s3: &S3Server, upstream: &Upstream) -> (Kura, TempDir) {
    replica_with(s3, upstream, "").await
}

/// A replica with more YAML under `storage:` (indented two spaces).
async fn replica_with(s3: &S3Server, upstream: &Upstream, storage: &str) -> (Kura, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kura.yml");
    let yaml = s3.storage_yaml(&dir.path().join("local")) + storage;
    std::fs::write(&config, yaml).unwrap();
    let mut options = KuraOptions::for_upstream(upstream);
    options.extra_args.push(config.display().to_string());
    (Kura::start(options).await, dir)
}

/// For each `async fn(S3Impl)` named, a module of that name with one test
/// per S3 implementation: `<name>::moto` and `<name>::s3s_fs`.
macro_rules! on_both_s3_implementations {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use super::S3Impl;

            #[tokio::test(flavor = "multi_thread")]
            async fn moto() {
                super::$name(S3Impl::Moto).await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn s3s_fs() {
                super::$name(S3Impl::S3sFs).await
            }
        }
    )+};
}

on_both_s3_implementations!(
    two_replicas_cold_pulling_at_once_both_succeed_and_store_one_copy,
    a_warm_blob_is_served_from_the_bucket_with_range,
    a_cold_pull_completes_while_the_bucket_is_paused_and_lands_after,
    a_bucket_failing_during_the_upload_fails_no_client_and_the_upload_is_retried,
);

#[tokio::test(flavor = "multi_thread")]
async fn what_one_replica_cached_another_serves_with_the_upstream_gone() {
    let s3 = S3Server::start().await;
    let mut upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let (a, _a_dir) = replica(&s3, &upstream).await;
    let (b, _b_dir) = replica(&s3, &upstream).await;

    let work = tempfile::tempdir().unwrap();
    let image = &seeded.multilayer;
    let index = &seeded.oci_index;
    let via_a = skopeo_copy(
        a.addr(),
        &image.reference(),
        &work.path().join("a-image"),
        false,
    );
    let index_via_a = skopeo_copy(
        a.addr(),
        &index.reference(),
        &work.path().join("a-index"),
        true,
    );

    let mut pulled = image.all_digests();
    pulled.extend(index.all_digests());
    s3.wait_for_blobs(&pulled).await;
    upstream.stop();
    let via_b = skopeo_copy(
        b.addr(),
        &image.reference(),
        &work.path().join("b-image"),
        false,
    );
    let index_via_b = skopeo_copy(
        b.addr(),
        &index.reference(),
        &work.path().join("b-index"),
        true,
    );
    assert_eq!(via_a, via_b);
    assert_eq!(via_b.digests, image.all_digests());
    assert_eq!(index_via_a, index_via_b);
    assert_eq!(index_via_b.digests, index.all_digests());

    wait_for_catalog(&b, vec![image.repository.clone(), index.repository.clone()]).await;
    let local_blobs = _b_dir.path().join("local/blobs");
    assert!(!local_blobs.exists(), "an S3 replica stored blobs locally");
}

async fn two_replicas_cold_pulling_at_once_both_succeed_and_store_one_copy(implementation: S3Impl) {
    let s3 = S3Server::start_with(implementation).await;
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let (a, _a_dir) = replica(&s3, &upstream).await;
    let (b, _b_dir) = replica(&s3, &upstream).await;
    let image = &seeded.multilayer;

    let (via_a, via_b) = tokio::join!(a.pull(image), b.pull(image));
    assert!(
        via_a,
        "the pull through replica a failed:\n{}",
        a.log_text()
    );
    assert!(
        via_b,
        "the pull through replica b failed:\n{}",
        b.log_text()
    );
    s3.wait_for_blobs(&image.all_digests()).await;

    let stored: Vec<String> = s3.keys("kura/blobs/sha256/").await;
    let distinct: BTreeSet<String> = stored
        .iter()
        .map(|key| format!("sha256:{}", key.rsplit('/').next().unwrap()))
        .collect();
    assert_eq!(
        stored.len(),
        distinct.len(),
        "a blob is stored twice: {stored:?}"
    );
    assert_eq!(distinct, image.all_digests());
    // Both replicas now serve it warm.
    assert!(a.pull(image).await);
    assert!(b.pull(image).await);
}

/// Cached blobs are fetched from the bucket by the client itself, through a
/// presigned URL; with `storage.redirect.disable` Kura streams them.
#[tokio::test(flavor = "multi_thread")]
async fn cached_blob_gets_redirect_to_the_bucket_unless_disabled() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let (redirecting, _dir) = replica(&s3, &upstream).await;
    let (streaming, _dir2) = replica_with(&s3, &upstream, "  redirect:\n    disable: true\n").await;
    let layer = &seeded.multilayer.layers[0];
    let path = format!(
        "/v2/{}/blobs/{}",
        seeded.multilayer.repository, layer.digest
    );
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |kura: &Kura| no_follow.get(format!("{}{path}", kura.url())).send();

    let cold = get(&redirecting).await.unwrap();
    assert_eq!(cold.status(), 200, "a cold blob streams through Kura");
    assert_eq!(sha256_digest(&cold.bytes().await.unwrap()), layer.digest);

    // The client was released once its bytes were verified; until the
    // upload lands, a request is still served from the staging file.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let cached = loop {
        let response = get(&redirecting).await.unwrap();
        if response.status() != 200 || std::time::Instant::now() > deadline {
            break response;
        }
        assert_eq!(
            sha256_digest(&response.bytes().await.unwrap()),
            layer.digest
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cached.status(), 307);
    assert_eq!(
        cached.headers()["docker-content-digest"],
        layer.digest.as_str()
    );
    let location = cached.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(s3.endpoint()),
        "redirected to the bucket: {location}"
    );
    let from_bucket = no_follow.get(&location).send().await.unwrap();
    assert_eq!(from_bucket.status(), 200);
    assert_eq!(
        sha256_digest(&from_bucket.bytes().await.unwrap()),
        layer.digest
    );
    let head = no_follow
        .head(format!("{}{path}", redirecting.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200, "HEAD is answered by Kura");

    let streamed = get(&streaming).await.unwrap();
    assert_eq!(streamed.status(), 200);
    assert_eq!(
        sha256_digest(&streamed.bytes().await.unwrap()),
        layer.digest
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_toolbox_works_on_the_bucket() {
    use std::process::Command;
    use support::process::run_tool;

    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kura.yml");
    std::fs::write(&config, s3.storage_yaml(&dir.path().join("local"))).unwrap();
    let kura = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kura"));
        command
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--upstream")
            .arg(upstream.url())
            .envs(env.iter().copied());
        let output = run_tool(command, Duration::from_secs(120));
        assert!(
            output.success(),
            "kura {args:?}: {}\n{}",
            output.stdout,
            output.stderr
        );
        output.stdout
    };
    let image = &seeded.multilayer;

    kura(&["warm", &image.reference()], &[]);
    let stored: BTreeSet<String> = s3
        .keys("kura/blobs/sha256/")
        .await
        .iter()
        .map(|key| format!("sha256:{}", key.rsplit('/').next().unwrap()))
        .collect();
    assert_eq!(stored, image.all_digests());
    assert!(kura(&["ls"], &[]).contains(&image.repository));
    assert!(kura(&["du"], &[]).contains(&format!("{} blobs", stored.len())));
    assert!(kura(&["verify"], &[]).contains(": 0 corrupt"));

    // The access record of a replica that went away, e.g. a replaced pod.
    let departed = "kura/_kura/access/departed-replica";
    s3.put(
        departed,
        r#"{"sha256:0000000000000000000000000000000000000000000000000000000000000000":1}"#,
    )
    .await;

    std::thread::sleep(Duration::from_millis(1500));
    let expire = [
        ("REGISTRY_PROXY_TTL", "1s"),
        ("REGISTRY_CACHE_GCGRACE", "0"),
    ];
    assert!(kura(&["gc", "--dry-run"], &expire).contains("would free"));
    assert_eq!(s3.keys("kura/blobs/sha256/").await.len(), stored.len());
    // A live replica's record, written just now, is younger than the TTL.
    let live = "kura/_kura/access/live-replica";
    s3.put(live, "{}").await;
    kura(&["gc"], &expire);
    assert!(
        s3.keys("kura/blobs/sha256/").await.is_empty(),
        "gc left blobs in the bucket"
    );
    assert!(
        !s3.keys("kura/_kura/access/")
            .await
            .contains(&departed.to_owned()),
        "an access record older than proxy.ttl outlived the collection"
    );
    assert!(
        s3.keys("kura/_kura/access/")
            .await
            .contains(&live.to_owned()),
        "a fresh access record was collected"
    );
    assert!(!kura(&["ls"], &[]).contains(&image.repository));
}

/// `encrypt` has S3 encrypt every object Kura writes (SSE-S3), and with
/// `keyid` under that KMS key (SSE-KMS), as Distribution's driver does:
/// blobs, manifests, links, multipart uploads included.
#[tokio::test(flavor = "multi_thread")]
async fn encrypt_and_keyid_encrypt_every_object_kura_writes() {
    use support::Platform;
    use support::images::{Flavor, ImageBuild, Layer, OCI_LAYER_TAR};

    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let small = seed_all(&upstream).await.multilayer;
    // Past one 5 MiB part: uploaded in parts.
    let data = varied_bytes(6 << 20);
    let large = ImageBuild::new(
        Flavor::Oci,
        Platform::linux("amd64", None),
        vec![Layer::plain(data, OCI_LAYER_TAR)],
    )
    .push(&upstream.client(), "encrypted/large", Some("latest"))
    .await;
    let (s3_managed, _dir) = replica_with(&s3, &upstream, "    encrypt: true\n").await;
    let kms_yaml = "    encrypt: true\n    keyid: kura-test-key\n";
    let (kms, _dir2) = replica_with(&s3, &upstream, kms_yaml).await;
    assert!(s3_managed.pull(&small).await);
    assert!(kms.pull(&large).await);

    let blob_key = |digest: &str| {
        let hex = &digest["sha256:".len()..];
        format!("kura/blobs/sha256/{}/{hex}", &hex[..2])
    };
    let mut pulled = small.all_digests();
    pulled.extend(large.all_digests());
    s3.wait_for_blobs(&pulled).await;
    s3.allow_anonymous_reads().await;
    for digest in small.all_digests() {
        let expected = (Some("AES256".into()), None);
        assert_eq!(
            s3.encryption(&blob_key(&digest)).await,
            expected,
            "{digest}"
        );
    }
    for digest in large.all_digests() {
        let expected = (Some("aws:kms".into()), Some("kura-test-key".into()));
        assert_eq!(
            s3.encryption(&blob_key(&digest)).await,
            expected,
            "{digest}"
        );
    }
    for key in s3.keys("kura/").await {
        let (algorithm, _) = s3.encryption(&key).await;
        assert!(algorithm.is_some(), "stored unencrypted: {key}");
    }
}

/// A repository cached through replica A shows in replica B's `_catalog`
/// within B's refresh interval, though B never linked it itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_repository_pulled_through_one_replica_shows_in_anothers_catalog() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let (a, _a_dir) = replica(&s3, &upstream).await;
    let (b, _b_dir) = replica(&s3, &upstream).await;
    assert!(b.catalog().await.is_empty());

    assert!(a.pull(&seeded.multilayer).await);
    wait_for_catalog(&b, vec![seeded.multilayer.repository.clone()]).await;
}

/// Waits until `kura`'s `_catalog` is `expected`: a repository another
/// replica linked shows after the next listing, within the catalog's
/// refresh (5 s; 30 s allowed for a busy machine).
async fn wait_for_catalog(kura: &Kura, expected: Vec<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while kura.catalog().await != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the catalog still lacks what another replica cached: {:?}",
            kura.catalog().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What one replica cached, another serves from the bucket with the
/// upstream gone, a `Range` included: read by the replica
/// (`redirect.disable`), or by the client itself through the presigned URL
/// it is redirected to.
async fn a_warm_blob_is_served_from_the_bucket_with_range(implementation: S3Impl) {
    let s3 = S3Server::start_with(implementation).await;
    let mut upstream = Upstream::anonymous().await;
    let data = varied_bytes(1 << 20);
    let image = one_layer_image(&upstream, "warm/range", data.clone()).await;
    let (a, _a_dir) = replica(&s3, &upstream).await;
    let (streaming, _dir) = replica_with(&s3, &upstream, "  redirect:\n    disable: true\n").await;
    let (redirecting, _dir2) = replica(&s3, &upstream).await;
    let layer = &image.layers[0];
    let cold = cold_layer_get(&a, &image).await.bytes().await.unwrap();
    assert_eq!(sha256_digest(&cold), layer.digest);
    s3.wait_for_blobs(&[layer.digest.clone()].into()).await;
    upstream.stop();

    let path = format!("/v2/{}/blobs/{}", image.repository, layer.digest);
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (start, end) = (300_000usize, 700_000usize);
    let range = format!("bytes={start}-{}", end - 1);
    let content_range = format!("bytes {start}-{}/{}", end - 1, data.len());
    let ranged = |url: String| client.get(url).header("Range", &range).send();

    let streamed = ranged(format!("{}{path}", streaming.url())).await.unwrap();
    assert_eq!(streamed.status(), 206, "{}", streaming.log_text());
    assert_eq!(streamed.headers()["content-range"], content_range.as_str());
    assert!(
        streamed.bytes().await.unwrap() == data[start..end],
        "wrong bytes for {range} through the replica"
    );

    let redirect = ranged(format!("{}{path}", redirecting.url()))
        .await
        .unwrap();
    assert_eq!(redirect.status(), 307, "{}", redirecting.log_text());
    let location = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(s3.endpoint()), "{location}");
    let from_bucket = ranged(location).await.unwrap();
    assert_eq!(from_bucket.status(), 206, "the presigned URL with {range}");
    assert_eq!(
        from_bucket.headers()["content-range"],
        content_range.as_str()
    );
    assert!(
        from_bucket.bytes().await.unwrap() == data[start..end],
        "wrong bytes for {range} from the bucket"
    );
}

/// `len` bytes that differ from one offset to the next (no run a
/// compressing or deduplicating layer could shorten).
fn varied_bytes(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A layer large enough that its upload takes a while (several parts).
async fn large_image(upstream: &Upstream, repository: &str) -> support::PushedImage {
    one_layer_image(upstream, repository, varied_bytes(256 << 20)).await
}

/// An image of one layer holding `data`, pushed as `<repository>:latest`.
async fn one_layer_image(
    upstream: &Upstream,
    repository: &str,
    data: Vec<u8>,
) -> support::PushedImage {
    use support::Platform;
    use support::images::{Flavor, ImageBuild, Layer, OCI_LAYER_TAR};
    ImageBuild::new(
        Flavor::Oci,
        Platform::linux("amd64", None),
        vec![Layer::plain(data, OCI_LAYER_TAR)],
    )
    .push(&upstream.client(), repository, Some("latest"))
    .await
}

/// Starts a cold GET of the image's layer through `kura` and returns
/// once its headers are in: the replica has looked in the bucket and is
/// downloading. Fails saying why when the answer is not a 200.
async fn cold_layer_get(kura: &Kura, image: &support::PushedImage) -> reqwest::Response {
    let layer = &image.layers[0];
    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        image.repository,
        layer.digest
    );
    let response = support::net::http_client(Duration::from_secs(60))
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", kura.log_text()));
    assert_eq!(
        response.status(),
        200,
        "GET {url}: not a 200\n{}",
        kura.log_text()
    );
    response
}

/// The client's last byte does not wait for the bucket: with the bucket
/// frozen for the whole transfer, the body still completes, and the
/// upload lands once the bucket answers again.
async fn a_cold_pull_completes_while_the_bucket_is_paused_and_lands_after(implementation: S3Impl) {
    let s3 = S3Server::start_with(implementation).await;
    let upstream = Upstream::anonymous().await;
    let image = large_image(&upstream, "paused/large").await;
    let (kura, _dir) = replica(&s3, &upstream).await;

    let response = cold_layer_get(&kura, &image).await;
    s3.pause();
    let body = tokio::time::timeout(Duration::from_secs(30), response.bytes()).await;
    let staged = largest_file_under(&kura.cache_dir().join("staging"));
    s3.resume();
    let body = body
        .unwrap_or_else(|_| panic!("the body waited for the paused bucket\n{}", kura.log_text()))
        .unwrap_or_else(|e| panic!("the body failed: {e}\n{}", kura.log_text()));
    assert_eq!(
        sha256_digest(&body),
        image.layers[0].digest,
        "wrong bytes from the replica"
    );
    assert_eq!(
        staged,
        body.len() as u64,
        "the upload finished before the client's last byte (no staging file left)"
    );
    s3.wait_for_blobs(&[image.layers[0].digest.clone()].into())
        .await;
}

/// The size of the largest file anywhere under `dir` (0 if none).
fn largest_file_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => largest_file_under(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .max()
        .unwrap_or(0)
}

/// A bucket that fails during the upload fails no client: the verified
/// bytes are served from staging, and the upload is retried until the
/// bucket is back.
async fn a_bucket_failing_during_the_upload_fails_no_client_and_the_upload_is_retried(
    implementation: S3Impl,
) {
    let mut s3 = S3Server::start_with(implementation).await;
    let upstream = Upstream::anonymous().await;
    let image = large_image(&upstream, "outage/large").await;
    let (kura, _dir) = replica(&s3, &upstream).await;

    let response = cold_layer_get(&kura, &image).await;
    s3.kill();
    let body = response
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("the body failed: {e}\n{}", kura.log_text()));
    assert_eq!(
        sha256_digest(&body),
        image.layers[0].digest,
        "wrong bytes from the replica"
    );
    // Back only once an attempt has failed (s3s-fs starts in a moment),
    // and before the last one (7 s later).
    let failed = support::net::poll_until(Duration::from_secs(30), || {
        kura.log_text()
            .contains("upload to the bucket failed; retrying")
    })
    .await;
    assert!(
        failed,
        "the upload did not fail first (the bucket was down):\n{}",
        kura.log_text()
    );
    s3.restart().await;
    s3.wait_for_blobs(&[image.layers[0].digest.clone()].into())
        .await;
}

/// A hung bucket fails a cached blob's request within
/// `storage.s3.responsetimeout` instead of holding it (and its connection)
/// forever, and the replica serves the blob again once the bucket answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_bucket_fails_requests_in_bounded_time_and_the_replica_recovers() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let image = one_layer_image(&upstream, "hung/bucket", vec![7u8; 256 << 10]).await;
    let extra = "    responsetimeout: 2s\n  redirect:\n    disable: true\n";
    let (kura, _dir) = replica_with(&s3, &upstream, extra).await;
    let layer = &image.layers[0];
    cold_layer_get(&kura, &image).await.bytes().await.unwrap();
    s3.wait_for_blobs(&[layer.digest.clone()].into()).await;
    let path = format!("/v2/{}/blobs/{}", image.repository, layer.digest);

    s3.pause();
    let answer = tokio::time::timeout(Duration::from_secs(20), kura.get(&path)).await;
    s3.resume();
    let answer =
        answer.unwrap_or_else(|_| panic!("a hung bucket held the request\n{}", kura.log_text()));
    // An error, or the blob fetched again from the live upstream: either
    // way an answer, and never wrong bytes.
    let status = answer.status();
    assert!(
        status.is_server_error() || status == 200,
        "GET {path} with the bucket hung: {status}"
    );
    if status == 200 {
        let body = answer.bytes().await.unwrap();
        assert_eq!(
            sha256_digest(&body),
            layer.digest,
            "wrong bytes, bucket hung"
        );
    }

    let response = kura.get(&path).await;
    assert_eq!(
        response.status(),
        200,
        "GET {path} after the bucket is back"
    );
    let body = response.bytes().await.unwrap();
    assert_eq!(
        sha256_digest(&body),
        layer.digest,
        "wrong bytes after recovery"
    );
}
