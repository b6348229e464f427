//! A real Distribution 2.8 registry (`docker-registry serve`) on 127.0.0.1, behind a counting
//! forwarder, with anonymous, htpasswd (Basic) or token (Bearer) auth.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tempfile::TempDir;

use super::forwarder::CountingForwarder;
use super::net::{free_port, loopback, wait_http};
use super::process::{ChildGuard, read_lossy, require_tool, run_tool_ok};
use super::registry_client::{Auth, RegistryClient};
use super::token::{DEFAULT_LIFETIME, ISSUER, SERVICE, TokenIssuer};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const START_ATTEMPTS: usize = 3;
const HTPASSWD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `count_requests` waits for the access log to stop growing.
const LOG_SETTLE_TIMEOUT: Duration = Duration::from_secs(1);
const LOG_SETTLE_STEP: Duration = Duration::from_millis(40);

/// How clients authenticate to the upstream.
enum UpstreamAuth {
    Anonymous,
    Htpasswd {
        user: String,
        pass: String,
    },
    Token {
        user: String,
        pass: String,
        issuer: TokenIssuer,
    },
}

/// One line of Distribution's access log (Apache combined format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

/// A running Distribution registry. `url()`/`addr()` go through a forwarder that counts the bytes
/// served; everything is stopped on drop.
pub struct Upstream {
    // Field order is drop order: forwarder and registry go before their files.
    forwarder: CountingForwarder,
    registry: ChildGuard,
    registry_addr: SocketAddr,
    auth: UpstreamAuth,
    dir: TempDir,
}

impl Upstream {
    /// A registry anyone may pull from and push to.
    pub async fn anonymous() -> Self {
        Self::start(UpstreamAuth::Anonymous).await
    }

    /// An anonymous registry that POSTs its push notifications (Distribution's
    /// `notifications.endpoints`) to `url` with this `Authorization` header.
    pub async fn notifying(url: &str, authorization: &str) -> Self {
        Self::start_with(
            UpstreamAuth::Anonymous,
            &notifications_yaml(url, authorization),
        )
        .await
    }

    /// A registry requiring HTTP Basic credentials (bcrypt htpasswd file).
    pub async fn htpasswd(user: &str, pass: &str) -> Self {
        Self::start(UpstreamAuth::Htpasswd {
            user: user.to_owned(),
            pass: pass.to_owned(),
        })
        .await
    }

    /// A registry requiring Bearer tokens from a [`TokenIssuer`] that wants `user`/`pass`.
    pub async fn token(user: &str, pass: &str) -> Self {
        let issuer = TokenIssuer::start(Some((user, pass)), DEFAULT_LIFETIME);
        Self::start(UpstreamAuth::Token {
            user: user.to_owned(),
            pass: pass.to_owned(),
            issuer,
        })
        .await
    }

    async fn start(auth: UpstreamAuth) -> Self {
        Self::start_with(auth, "").await
    }

    /// Starts the registry with `extra` appended to its configuration.
    async fn start_with(auth: UpstreamAuth, extra: &str) -> Self {
        let binary = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("kura-upstream-")
            .tempdir()
            .expect("upstream temp dir");
        let auth_section = write_auth_files(&auth, dir.path()) + extra;
        let mut failures = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let registry_addr = loopback(free_port());
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                config_yaml(dir.path(), registry_addr, &auth_section),
            )
            .expect("write registry config");
            let mut cmd = Command::new(&binary);
            cmd.arg("serve").arg(&config);
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let mut registry = ChildGuard::spawn("docker-registry", cmd, &log);
            let ready = wait_http(
                &format!("http://{registry_addr}/v2/"),
                READY_TIMEOUT,
                |s| s == StatusCode::OK || s == StatusCode::UNAUTHORIZED,
                || registry.check_running(),
            )
            .await;
            match ready {
                Ok(_) => {
                    return Self {
                        forwarder: CountingForwarder::start(registry_addr),
                        registry,
                        registry_addr,
                        auth,
                        dir,
                    };
                }
                Err(e) => {
                    let _ = writeln!(failures, "attempt {attempt}: {e}");
                }
            }
        }
        panic!("docker-registry did not start:\n{failures}");
    }

    /// `http://127.0.0.1:PORT` of the counting forwarder in front of the registry.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Address of the counting forwarder (what clients and Kura should use).
    pub fn addr(&self) -> SocketAddr {
        self.forwarder.addr()
    }

    /// Address of the registry itself, bypassing the byte counter.
    pub fn direct_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// The credentials a client needs (`None` for the anonymous variant).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match &self.auth {
            UpstreamAuth::Anonymous => None,
            UpstreamAuth::Htpasswd { user, pass } | UpstreamAuth::Token { user, pass, .. } => {
                Some((user, pass))
            }
        }
    }

    /// The token issuer of the token variant.
    pub fn token_issuer(&self) -> Option<&TokenIssuer> {
        match &self.auth {
            UpstreamAuth::Token { issuer, .. } => Some(issuer),
            _ => None,
        }
    }

    /// A registry client for this upstream, with its credentials (through the forwarder).
    pub fn client(&self) -> RegistryClient {
        let auth = match self.credentials() {
            None => Auth::Anonymous,
            Some((user, pass)) => Auth::basic(user, pass),
        };
        RegistryClient::new(&self.url(), auth)
    }

    /// Kills the registry and closes the forwarder: new connections are refused.
    pub fn stop(&mut self) {
        self.forwarder.stop();
        self.registry.kill();
    }

    /// Freezes the registry (SIGSTOP): connections are accepted but never answered.
    pub fn pause(&self) {
        self.registry.signal("STOP");
    }

    /// Undoes [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&self) {
        self.registry.signal("CONT");
    }

    /// Bytes sent from the registry to clients through `url()` so far.
    pub fn bytes_served(&self) -> u64 {
        self.forwarder.bytes_served()
    }

    /// Requests whose method equals `method` and whose URI (path and query) contains
    /// `path_substring`, from the access log (waits briefly for the log to settle).
    pub fn count_requests(&self, method: &str, path_substring: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.uri.contains(path_substring))
            .count()
    }

    /// Every request in the access log so far, oldest first (waits briefly for the log to settle).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        settled_log(&self.log_path())
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// The registry's log (info level: logrus lines plus access-log lines).
    pub fn log_text(&self) -> String {
        self.registry.log_text()
    }

    pub fn log_path(&self) -> PathBuf {
        self.registry.log_path().to_owned()
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }
}

/// Writes the htpasswd file or the token certificate bundle; returns the YAML `auth:` section.
fn write_auth_files(auth: &UpstreamAuth, dir: &Path) -> String {
    match auth {
        UpstreamAuth::Anonymous => String::new(),
        UpstreamAuth::Htpasswd { user, pass } => {
            let path = dir.join("htpasswd");
            std::fs::write(&path, htpasswd_line(user, pass)).expect("write htpasswd");
            format!(
                "auth:\n  htpasswd:\n    realm: kura-test\n    path: {}\n",
                path.display()
            )
        }
        UpstreamAuth::Token { issuer, .. } => {
            let path = dir.join("token-ca.pem");
            std::fs::write(&path, issuer.cert_pem()).expect("write rootcertbundle");
            format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    \
                 rootcertbundle: {}\n",
                issuer.realm(),
                path.display()
            )
        }
    }
}

/// The `notifications:` section README.md shows: every push is POSTed to `url`, blob pushes
/// left out (`ignoredmediatypes`), with `authorization` as the header Kura checks.
pub fn notifications_yaml(url: &str, authorization: &str) -> String {
    format!(
        "notifications:
  endpoints:
    - name: kura
      url: {url}
      headers:
        Authorization: [\"{authorization}\"]
      timeout: 2s
      threshold: 5
      backoff: 1s
      ignoredmediatypes:
        - application/octet-stream
"
    )
}

/// `user:$2y$...` from `htpasswd -Bbn` (Distribution accepts bcrypt only).
fn htpasswd_line(user: &str, pass: &str) -> String {
    let mut cmd = Command::new(require_tool("htpasswd"));
    cmd.args(["-Bbn", user, pass]);
    run_tool_ok(cmd, HTPASSWD_TIMEOUT).stdout.trim().to_owned() + "\n"
}

fn config_yaml(dir: &Path, addr: SocketAddr, auth_section: &str) -> String {
    format!(
        "version: 0.1
log:
  level: info
  accesslog:
    disabled: false
  fields:
    service: kura-test-upstream
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: kura-test-upstream-secret
{auth_section}",
        storage = dir.join("storage").display(),
    )
}

/// The log once two reads a moment apart agree (bounded): the registry writes its access-log line
/// just after the response, so a client may be done before the line is.
fn settled_log(path: &Path) -> String {
    let deadline = Instant::now() + LOG_SETTLE_TIMEOUT;
    let mut text = read_lossy(path);
    while Instant::now() < deadline {
        std::thread::sleep(LOG_SETTLE_STEP);
        let again = read_lossy(path);
        if again == text {
            break;
        }
        text = again;
    }
    text
}

/// Parses one access-log line, `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`.
pub fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut request = request.split(' ');
    let method = request.next()?.to_owned();
    let uri = request.next()?.to_owned();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(LoggedRequest {
        method,
        uri,
        status,
    })
}
