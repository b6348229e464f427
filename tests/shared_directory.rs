//! Several Kura processes on one cache directory (issue 19): each stages in
//! a locked directory of its own, so a process starting (a rolling
//! restart's successor, a replica, `kura warm`) never destroys another's
//! downloads, and processes starting at once never trip over each other.
//!
//! A download is held mid-way by freezing the real upstream (SIGSTOP) right
//! after Kura answered the client's headers: its staging file then exists
//! while the other process starts.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use support::images::one_layer_image;
use support::kura::{blob_path, staged_files, staging_dirs};
use support::process::{ToolOutput, run_tool, send_signal};
use support::s3::S3Server;
use support::{Blob, Kura, KuraOptions, PushedImage, Upstream, seed_large};
use tempfile::TempDir;

/// How long a commit may take to show once its client has the last byte.
const COMMIT_WAIT: Duration = Duration::from_secs(20);

/// Where the Kuras under test keep their blobs; staging is always the
/// shared local directory.
enum Backend {
    Disk,
    /// The bucket, with the config file that names it.
    Bucket(S3Server, TempDir),
}

impl Backend {
    async fn bucket() -> Self {
        let s3 = S3Server::start().await;
        let config = tempfile::tempdir().unwrap();
        // `--cache-dir` (the shared directory) overrides this local root,
        // as the default `~/.cache/kura` is shared by replicas on one host.
        let yaml = s3.storage_yaml(&config.path().join("unused"));
        std::fs::write(config.path().join("kura.yml"), yaml).unwrap();
        Backend::Bucket(s3, config)
    }

    fn options(&self, upstream: &Upstream, dir: &Path) -> KuraOptions {
        let mut options = KuraOptions::for_upstream(upstream);
        options.cache_dir = Some(dir.to_owned());
        if let Backend::Bucket(_, config) = self {
            let config = config.path().join("kura.yml");
            options.extra_args.push(config.display().to_string());
        }
        options
    }

    async fn has_blob(&self, dir: &Path, digest: &str) -> bool {
        match self {
            Backend::Disk => blob_path(dir, digest).exists(),
            Backend::Bucket(s3, _) => {
                let hex = &digest["sha256:".len()..];
                let key = format!("kura/blobs/sha256/{}/{hex}", &hex[..2]);
                s3.keys(&key).await.contains(&key)
            }
        }
    }

    /// Waits (bounded) until `digest` is committed.
    async fn wait_committed(&self, dir: &Path, digest: &str) {
        let deadline = Instant::now() + COMMIT_WAIT;
        while !self.has_blob(dir, digest).await {
            assert!(Instant::now() < deadline, "{digest} was never committed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn largest(image: &PushedImage) -> &Blob {
    image.layers.iter().max_by_key(|b| b.size).unwrap()
}

/// A cold blob GET on `kura` whose download is then frozen mid-way: the
/// upstream is stopped as soon as Kura answered with the headers (the
/// staging file exists by then). Resume the upstream to let it finish.
async fn start_frozen_download(
    kura: &Kura,
    upstream: &Upstream,
    image: &PushedImage,
) -> reqwest::Response {
    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        image.repository,
        largest(image).digest
    );
    let response = support::net::http_client(Duration::from_secs(300))
        .get(url)
        .send()
        .await
        .unwrap();
    upstream.pause();
    assert_eq!(response.status(), StatusCode::OK);
    response
}

/// The digest of the whole body, hashed as it arrives (with ring, as
/// `sha256_digest`: fast in unoptimised builds).
async fn body_digest(response: reqwest::Response) -> String {
    let mut body = response.bytes_stream();
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    while let Some(chunk) = body.next().await {
        hasher.update(&chunk.expect("body chunk"));
    }
    format!("sha256:{}", hex::encode(hasher.finish()))
}

fn assert_still_staged(dir: &Path, when: &str) {
    assert!(
        staged_files(dir) > 0,
        "{when}: the frozen download is no longer staged"
    );
}

/// Kura B starts on A's directory while A's 256 MiB download runs: A's
/// client gets every byte and the blob is committed.
async fn a_start_leaves_a_running_download_alone(backend: Backend) {
    let upstream = Upstream::anonymous().await;
    let large = seed_large(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = Kura::start(backend.options(&upstream, dir.path())).await;
    let response = start_frozen_download(&a, &upstream, &large).await;

    let mut b = Kura::start(backend.options(&upstream, dir.path())).await;
    assert_still_staged(dir.path(), "after B started");
    assert_eq!(staging_dirs(dir.path()).len(), 2, "one per process");
    upstream.resume();

    let digest = &largest(&large).digest;
    assert_eq!(&body_digest(response).await, digest, "A's client body");
    backend.wait_committed(dir.path(), digest).await;
    a.check_running().unwrap();
    b.check_running().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kura_starting_on_the_directory_leaves_a_running_download_alone() {
    a_start_leaves_a_running_download_alone(Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_replica_starting_on_the_local_directory_leaves_a_running_download_alone() {
    a_start_leaves_a_running_download_alone(Backend::bucket().await).await;
}

/// Startup races: 4 processes started together on a fresh directory, 20
/// times over; every one gets ready with a staging directory of its own.
#[tokio::test(flavor = "multi_thread")]
async fn processes_starting_at_once_on_a_fresh_directory_all_start() {
    // Nothing is fetched: an upstream nobody listens on will do.
    let options = KuraOptions::new("http://127.0.0.1:9");
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let mut options = options.clone();
        options.cache_dir = Some(dir.path().to_owned());
        // Each start spawns its process when first polled: all at once.
        let kuras = futures_util::future::join_all((0..4).map(|_| Kura::start(options.clone())));
        let kuras = kuras.await;
        assert_eq!(staging_dirs(dir.path()).len(), 4, "round {round}");
        drop(kuras);
    }
}

fn warm(cache: &Path, upstream: &Upstream, image: &str) -> ToolOutput {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kura"));
    command
        .args(["warm", image, "--cache-dir"])
        .arg(cache)
        .arg("--upstream")
        .arg(upstream.url());
    run_tool(command, Duration::from_secs(120))
}

/// `kura warm` runs (and exits) beside a Kura that is mid-download on the
/// same directory: both finish.
#[tokio::test(flavor = "multi_thread")]
async fn warm_beside_a_serving_kura_both_complete() {
    let (served_upstream, warmed_upstream) =
        (Upstream::anonymous().await, Upstream::anonymous().await);
    let large = seed_large(&served_upstream).await;
    let small = one_layer_image(1 << 20, 0x5EED_0019)
        .push(&warmed_upstream.client(), "warm/small", Some("latest"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut kura = Kura::start(KuraOptions {
        cache_dir: Some(dir.path().to_owned()),
        ..KuraOptions::for_upstream(&served_upstream)
    })
    .await;
    let response = start_frozen_download(&kura, &served_upstream, &large).await;

    let warmed = warm(dir.path(), &warmed_upstream, &small.reference());
    assert!(
        warmed.success(),
        "warm: {}\n{}",
        warmed.stdout,
        warmed.stderr
    );
    for blob in std::iter::once(&small.config).chain(&small.layers) {
        assert!(
            blob_path(dir.path(), &blob.digest).exists(),
            "{} not warmed",
            blob.digest
        );
    }
    assert_still_staged(dir.path(), "after warm");
    assert_eq!(staging_dirs(dir.path()).len(), 1, "warm left its staging");
    served_upstream.resume();

    let digest = &largest(&large).digest;
    assert_eq!(&body_digest(response).await, digest, "the client's body");
    Backend::Disk.wait_committed(dir.path(), digest).await;
    kura.check_running().unwrap();
}

/// A rolling restart: A gets SIGTERM while a client is mid-download and B
/// starts at once on the same directory. The client's download completes
/// within A's drain time, and B serves the blob afterwards (from the
/// cache: the upstream is gone by then).
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_lets_the_old_process_finish_its_download() {
    const DRAIN: Duration = Duration::from_secs(30);
    let mut upstream = Upstream::anonymous().await;
    let large = seed_large(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let mut options = KuraOptions::for_upstream(&upstream);
    options.cache_dir = Some(dir.path().to_owned());
    options.extra_env.push((
        "REGISTRY_HTTP_DRAINTIMEOUT".into(),
        format!("{}s", DRAIN.as_secs()),
    ));
    let mut a = Kura::start(options.clone()).await;
    let response = start_frozen_download(&a, &upstream, &large).await;

    send_signal(a.pid(), "TERM");
    let terminated = Instant::now();
    let b = Kura::start(options).await;
    assert_still_staged(dir.path(), "after B started");
    upstream.resume();

    let digest = &largest(&large).digest;
    let body = tokio::time::timeout(DRAIN, body_digest(response)).await;
    assert_eq!(
        &body.expect("download not done within the drain time"),
        digest
    );
    let left = DRAIN.saturating_sub(terminated.elapsed()) + Duration::from_secs(5);
    assert!(a.terminate(left).await, "A did not exit after draining");
    assert!(staging_dirs(dir.path()).len() == 1, "A left its staging");

    upstream.stop();
    let url = format!("{}/v2/{}/blobs/{digest}", b.url(), large.repository);
    let response = support::net::http_client(Duration::from_secs(120))
        .get(url)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(&body_digest(response).await, digest, "B's body");
}
