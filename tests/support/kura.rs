//! Launching the binary under test: `kura serve --listen 127.0.0.1:PORT --upstream URL --cache-dir DIR`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use tempfile::TempDir;

use super::net::{free_port, loopback, wait_http};
use super::process::ChildGuard;
use super::upstream::Upstream;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How to run Kura.
#[derive(Clone, Debug, Default)]
pub struct KuraOptions {
    pub upstream_url: String,
    /// Passed as `REGISTRY_PROXY_USERNAME`.
    pub username: Option<String>,
    /// Passed as `REGISTRY_PROXY_PASSWORD`.
    pub password: Option<String>,
    /// Defaults to a fresh temp dir owned by the [`Kura`] guard.
    pub cache_dir: Option<PathBuf>,
    /// Appended after the standard `serve` arguments.
    pub extra_args: Vec<String>,
    /// Set after the defaults (so they can override `RUST_LOG`).
    pub extra_env: Vec<(String, String)>,
    /// Kura serves HTTPS (its config sets `http.tls`): `url()` says so.
    pub tls: bool,
    /// Listen here instead of a fresh port: for an upstream configured
    /// with Kura's address before Kura starts (push notifications).
    pub addr: Option<SocketAddr>,
}

impl KuraOptions {
    pub fn new(upstream_url: &str) -> Self {
        Self {
            upstream_url: upstream_url.to_owned(),
            ..Self::default()
        }
    }

    /// Proxies `upstream` (through its byte counter) with its credentials, if any.
    pub fn for_upstream(upstream: &Upstream) -> Self {
        let credentials = upstream.credentials();
        Self {
            username: credentials.map(|(user, _)| user.to_owned()),
            password: credentials.map(|(_, pass)| pass.to_owned()),
            ..Self::new(&upstream.url())
        }
    }
}

/// A running Kura; killed on drop. Its log (stdout + stderr of every run) is kept in a file.
pub struct Kura {
    // Field order is drop order: the process goes before its directories.
    process: ChildGuard,
    options: KuraOptions,
    addr: SocketAddr,
    cache_dir: PathBuf,
    _own_cache: Option<TempDir>,
    log_dir: TempDir,
}

impl Kura {
    /// Starts Kura and waits (20 s at most) until `GET /healthz` answers 200; panics with the log
    /// if it exits or never gets ready.
    pub async fn start(options: KuraOptions) -> Self {
        let log_dir = temp_dir("kura-log-");
        let (cache_dir, own_cache) = match &options.cache_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let dir = temp_dir("kura-cache-");
                (dir.path().to_owned(), Some(dir))
            }
        };
        let addr = options.addr.unwrap_or_else(|| loopback(free_port()));
        let process = spawn(&options, addr, &cache_dir, log_dir.path());
        let mut kura = Self {
            process,
            options,
            addr,
            cache_dir,
            _own_cache: own_cache,
            log_dir,
        };
        kura.wait_ready().await;
        kura
    }

    /// Kills Kura (if running) and starts it again on the same port with the same cache dir.
    pub async fn restart(&mut self) {
        self.process.kill();
        self.process = spawn(
            &self.options,
            self.addr,
            &self.cache_dir,
            self.log_dir.path(),
        );
        self.wait_ready().await;
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        self.process.kill();
    }

    /// `Ok` while the process runs, else the exit status and log.
    pub fn check_running(&mut self) -> Result<(), String> {
        self.process.check_running()
    }

    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// SIGTERM, then waits (bounded) for the process to exit; `true` if it did.
    pub async fn terminate(&mut self, timeout: std::time::Duration) -> bool {
        self.process.signal("TERM");
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.process.check_running().is_err() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        false
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `GET path` (e.g. `/v2/_catalog`) parsed as JSON; panics on failure.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let client = super::net::http_client(std::time::Duration::from_secs(30));
        let response = client
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .expect("GET");
        response.json().await.expect("JSON body")
    }

    /// Pulls `image` the way a client does (manifest by tag, then config and
    /// layers), checking every digest. `true` if everything was served and
    /// correct.
    pub async fn pull(&self, image: &super::PushedImage) -> bool {
        use super::images::sha256_digest;
        let client = super::net::http_client(std::time::Duration::from_secs(120));
        let tag = image.tag.as_deref().unwrap_or("latest");
        let manifest = format!("{}/v2/{}/manifests/{tag}", self.url(), image.repository);
        let served = |response: &reqwest::Response| response.status() == reqwest::StatusCode::OK;
        let Ok(response) = client.get(&manifest).send().await else {
            return false;
        };
        if !served(&response) {
            return false;
        }
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            let url = format!(
                "{}/v2/{}/blobs/{}",
                self.url(),
                image.repository,
                blob.digest
            );
            let Ok(response) = client.get(&url).send().await else {
                return false;
            };
            if !served(&response) {
                return false;
            }
            match response.bytes().await {
                Ok(body) if sha256_digest(&body) == blob.digest => {}
                _ => return false,
            }
        }
        true
    }

    /// `GET path` (e.g. `/v2/`) with a patient client; panics if no answer.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        super::net::http_client(std::time::Duration::from_secs(120))
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `GET /metrics` as text; panics on failure.
    pub async fn metrics_text(&self) -> String {
        let client = super::net::http_client(std::time::Duration::from_secs(30));
        let response = client.get(format!("{}/metrics", self.url())).send().await;
        response
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits (20 s at most, then panics) until no blob download runs: a
    /// pull is released once its bytes are verified, and the commit
    /// follows.
    pub async fn wait_downloads_settled(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let metrics = self.metrics_text().await;
            let running = metrics.lines().any(|line| {
                line.strip_prefix("kura_downloads_in_flight ")
                    .is_some_and(|value| value.trim() != "0")
            });
            if !running {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "downloads still running"
            );
            tokio::time::sleep(super::net::POLL_INTERVAL).await;
        }
    }

    /// The repositories `/v2/_catalog` lists.
    pub async fn catalog(&self) -> Vec<String> {
        let body = self.get_json("/v2/_catalog").await;
        serde_json::from_value(body["repositories"].clone()).expect("repositories list")
    }

    /// Everything Kura wrote to stdout and stderr, across restarts.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/healthz", self.url());
        let process = &mut self.process;
        let ready = wait_http(
            &url,
            READY_TIMEOUT,
            |s| s == StatusCode::OK,
            || process.check_running(),
        )
        .await;
        if let Err(e) = ready {
            panic!("kura did not get ready: {e}\nlog:\n{}", self.log_text());
        }
    }
}

/// Where a committed blob lives in a local cache.
pub fn blob_path(cache_dir: &Path, digest: &str) -> PathBuf {
    let hex = &digest["sha256:".len()..];
    cache_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// The staging directories under `cache_dir`: one per process that uses
/// it, until it exits (or, after a crash, until the next sweep).
pub fn staging_dirs(cache_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache_dir.join("staging")).map_or_else(
        |_| Vec::new(),
        |entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.is_dir())
                .collect()
        },
    )
}

/// Files staged under `cache_dir` by any process (downloads and small
/// writes in progress), not counting the owners' lock files.
pub fn staged_files(cache_dir: &Path) -> usize {
    staging_dirs(cache_dir)
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|files| files.flatten())
        .filter(|file| file.file_name() != ::kura::storage::staging::LOCK_FILE)
        .count()
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

fn spawn(options: &KuraOptions, addr: SocketAddr, cache_dir: &Path, log_dir: &Path) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kura"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--upstream")
        .arg(&options.upstream_url)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(&options.extra_args)
        .env_remove("REGISTRY_PROXY_USERNAME")
        .env_remove("REGISTRY_PROXY_PASSWORD")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    if let Some(user) = &options.username {
        cmd.env("REGISTRY_PROXY_USERNAME", user);
    }
    if let Some(pass) = &options.password {
        cmd.env("REGISTRY_PROXY_PASSWORD", pass);
    }
    cmd.envs(options.extra_env.iter().map(|(k, v)| (k, v)));
    ChildGuard::spawn("kura", cmd, &log_dir.join("kura.log"))
}
