//! An S3-protocol server for the tests, on a loopback port with one
//! bucket, killed on drop: moto's server (`pip install 'moto[server]'`)
//! or s3s-fs (`cargo install s3s-fs --features binary`), a second,
//! independent implementation that keeps the bucket as files in a
//! directory. The tests read and write the bucket with signed requests
//! (OpenDAL), which both accept; what only moto can do says so.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::net::{free_port, http_client, wait_http};
use super::process::{ChildGuard, require_tool};

pub const BUCKET: &str = "kura-test";
pub const ACCESS_KEY: &str = "test-access";
pub const SECRET_KEY: &str = "test-secret";

/// Which S3 implementation serves the bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Impl {
    /// moto's server: everything in memory, anonymous requests accepted,
    /// bucket policies and server-side encryption modelled.
    Moto,
    /// s3s-fs: objects are files under a directory, every request must be
    /// signed with the access key, no bucket policies nor encryption
    /// (`x-amz-server-side-encryption` is neither applied nor reported).
    S3sFs,
}

impl S3Impl {
    fn tool(self) -> &'static str {
        match self {
            S3Impl::Moto => "moto_server",
            S3Impl::S3sFs => "s3s-fs",
        }
    }

    /// The server's command line; s3s-fs keeps the bucket under `data`.
    fn command(self, port: u16, data: &Path) -> Command {
        let mut command = Command::new(require_tool(self.tool()));
        let port = port.to_string();
        match self {
            S3Impl::Moto => command.args(["-H", "127.0.0.1", "-p", &port]),
            S3Impl::S3sFs => command
                .args(["--host", "127.0.0.1", "--port", &port])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(data),
        };
        command
    }
}

pub struct S3Server {
    implementation: S3Impl,
    process: ChildGuard,
    port: u16,
    endpoint: String,
    /// Logs, and s3s-fs's data under `data/`.
    dir: TempDir,
}

impl S3Server {
    /// moto's server.
    pub async fn start() -> Self {
        Self::start_with(S3Impl::Moto).await
    }

    pub async fn start_with(implementation: S3Impl) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let process = spawn_with_bucket(implementation, port, dir.path()).await;
        Self {
            implementation,
            process,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the
    /// kernel but nothing answers, as with a bucket that stalls.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    pub fn resume(&self) {
        self.process.signal("CONT");
    }

    /// After [`S3Server::kill`]: the server again on the same port, as a
    /// bucket back from an outage. moto comes back empty (with the bucket
    /// created again); s3s-fs comes back with what it had stored.
    pub async fn restart(&mut self) {
        self.process = spawn_with_bucket(self.implementation, self.port, self.dir.path()).await;
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A Distribution-style `storage:` section for this bucket, with
    /// `local` as the (staging-only) root directory.
    pub fn storage_yaml(&self, local: &Path) -> String {
        format!(
            "storage:\n  filesystem:\n    rootdirectory: {}\n  s3:\n    region: us-east-1\n    bucket: {BUCKET}\n    \
             regionendpoint: {}\n    accesskey: {ACCESS_KEY}\n    secretkey: {SECRET_KEY}\n    rootdirectory: /kura\n",
            local.display(),
            self.endpoint
        )
    }

    /// The bucket as a client of our own sees it (signed requests, path
    /// style, the whole bucket as its root).
    fn bucket(&self) -> opendal::Operator {
        // reqwest for OpenDAL is built without a TLS provider of its own;
        // the server is plain HTTP, but the client wants one all the same.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest_s3::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client for the test bucket");
        let transport = opendal_http_transport_reqwest::ReqwestTransport::new(client);
        let builder = opendal::services::S3::default()
            .bucket(BUCKET)
            .region("us-east-1")
            .endpoint(&self.endpoint)
            .access_key_id(ACCESS_KEY)
            .secret_access_key(SECRET_KEY)
            .disable_config_load()
            .disable_ec2_metadata();
        opendal::Operator::new(builder)
            .expect("an S3 client for the test bucket")
            .with_context(
                opendal::OperationContext::new()
                    .with_http_transport(opendal::HttpTransporter::new(transport)),
            )
    }

    /// Stores an object directly, as another process writing to the
    /// bucket would.
    pub async fn put(&self, key: &str, body: &'static str) {
        self.bucket()
            .write(key, body)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// Waits (30 s at most, then panics) until every blob in `digests` is
    /// in the bucket under the root `kura`: replicas release a client once
    /// its bytes are verified, and upload after.
    pub async fn wait_for_blobs(&self, digests: &std::collections::BTreeSet<String>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stored: std::collections::BTreeSet<String> = self
                .keys("kura/blobs/sha256/")
                .await
                .iter()
                .map(|key| format!("sha256:{}", key.rsplit('/').next().unwrap_or("")))
                .collect();
            if digests.is_subset(&stored) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "blobs never uploaded: {:?}",
                digests.difference(&stored).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Keys in the bucket under `prefix` (listed, every page).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.bucket()
            .list_with(prefix)
            .recursive(true)
            .await
            .unwrap_or_else(|e| panic!("list {prefix}: {e}"))
            .into_iter()
            .filter(|entry| entry.metadata().is_file())
            .map(|entry| entry.path().to_owned())
            .collect()
    }

    /// Lets anyone read the bucket's objects (moto refuses anonymous
    /// reads otherwise), so a test can look at them unsigned. Moto checks a
    /// HEAD as `s3:HeadObject`, an action AWS does not have. Moto only:
    /// s3s-fs has no bucket policies.
    pub async fn allow_anonymous_reads(&self) {
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject", "s3:HeadObject"],
                "Resource": format!("arn:aws:s3:::{BUCKET}/*"),
            }],
        });
        let set = http_client(Duration::from_secs(10))
            .put(format!("{}/{BUCKET}?policy", self.endpoint))
            .header("Content-Type", "application/json")
            .body(policy.to_string())
            .send()
            .await
            .expect("put bucket policy");
        assert!(set.status().is_success(), "bucket policy: {}", set.status());
    }

    /// How an object is encrypted, as a HEAD reports it: the
    /// `x-amz-server-side-encryption` algorithm and the KMS key id, if any.
    /// Needs [`S3Server::allow_anonymous_reads`], so moto only (s3s-fs
    /// does not encrypt).
    pub async fn encryption(&self, key: &str) -> (Option<String>, Option<String>) {
        let head = http_client(Duration::from_secs(10))
            .head(format!("{}/{BUCKET}/{key}", self.endpoint))
            .send()
            .await
            .expect("head object");
        assert!(head.status().is_success(), "HEAD {key}: {}", head.status());
        let header = |name: &str| {
            head.headers()
                .get(name)
                .map(|v| v.to_str().expect("ASCII header").to_owned())
        };
        (
            header("x-amz-server-side-encryption"),
            header("x-amz-server-side-encryption-aws-kms-key-id"),
        )
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// Starts `implementation` on `port` with the bucket [`BUCKET`], its log
/// and (s3s-fs) its data in `dir`, and waits until it answers.
async fn spawn_with_bucket(implementation: S3Impl, port: u16, dir: &Path) -> ChildGuard {
    let data = dir.join("data");
    if implementation == S3Impl::S3sFs {
        // A bucket of s3s-fs is a directory under its root.
        std::fs::create_dir_all(data.join(BUCKET)).expect("create the bucket directory");
    }
    let tool = implementation.tool();
    let mut process = ChildGuard::spawn(
        tool,
        implementation.command(port, &data),
        &dir.join(format!("{tool}.log")),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    // Any answer will do: s3s-fs refuses unsigned requests.
    if let Err(e) = wait_http(
        &endpoint,
        Duration::from_secs(20),
        |_| true,
        || process.check_running(),
    )
    .await
    {
        panic!("{tool} did not start: {e}");
    }
    if implementation == S3Impl::Moto {
        // Moto accepts an unsigned CreateBucket.
        let created = http_client(Duration::from_secs(10))
            .put(format!("{endpoint}/{BUCKET}"))
            .send()
            .await
            .expect("create bucket");
        assert!(
            created.status().is_success(),
            "create bucket: {}",
            created.status()
        );
    }
    process
}
