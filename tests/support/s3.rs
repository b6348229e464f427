//! An S3-protocol server for the tests: moto's server (`pip install
//! 'moto[server]'`) on a loopback port, with one bucket; killed on drop.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::net::{free_port, http_client, wait_http_ok};
use super::process::{ChildGuard, require_tool};

pub const BUCKET: &str = "kura-test";
pub const ACCESS_KEY: &str = "test-access";
pub const SECRET_KEY: &str = "test-secret";

pub struct S3Server {
    process: ChildGuard,
    port: u16,
    endpoint: String,
    log_dir: TempDir,
}

impl S3Server {
    pub async fn start() -> Self {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let process = spawn_with_bucket(port, log_dir.path()).await;
        Self {
            process,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            log_dir,
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

    /// After [`S3Server::kill`]: a new, empty server with the bucket on
    /// the same port, as a bucket back from an outage (moto keeps nothing).
    pub async fn restart(&mut self) {
        self.process = spawn_with_bucket(self.port, self.log_dir.path()).await;
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

    /// Stores an object directly (moto accepts unsigned requests), as
    /// another process writing to the bucket would.
    pub async fn put(&self, key: &str, body: &'static str) {
        let stored = http_client(Duration::from_secs(10))
            .put(format!("{}/{BUCKET}/{key}", self.endpoint))
            .body(body)
            .send()
            .await
            .expect("put object");
        assert!(
            stored.status().is_success(),
            "put {key}: {}",
            stored.status()
        );
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

    /// Keys in the bucket under `prefix` (ListObjectsV2, following pages).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let client = http_client(Duration::from_secs(30));
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/{BUCKET}?list-type=2&prefix={prefix}", self.endpoint);
            if let Some(token) = &token {
                url.push_str(&format!("&continuation-token={token}"));
            }
            let body = client
                .get(&url)
                .send()
                .await
                .expect("list")
                .text()
                .await
                .expect("list body");
            keys.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken")
                .into_iter()
                .next();
            if token.is_none() {
                return keys;
            }
        }
    }

    /// Lets anyone read the bucket's objects (moto refuses anonymous
    /// reads otherwise), so a test can look at them unsigned. Moto checks a
    /// HEAD as `s3:HeadObject`, an action AWS does not have.
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
    /// Needs [`S3Server::allow_anonymous_reads`].
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

async fn spawn_with_bucket(port: u16, log_dir: &Path) -> ChildGuard {
    let mut command = Command::new(require_tool("moto_server"));
    command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let process = ChildGuard::spawn("moto_server", command, &log_dir.join("moto.log"));
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{endpoint}/moto-api/"), Duration::from_secs(20)).await;
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
    process
}

fn xml_values(body: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    body.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(value, _)| value.to_owned()))
        .collect()
}
