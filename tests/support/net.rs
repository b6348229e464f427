//! Loopback networking helpers: free ports, HTTP clients, bounded readiness polling.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

/// How often readiness loops poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    bind_loopback().local_addr().expect("local_addr").port()
}

/// A listener on 127.0.0.1 with a kernel-chosen port.
pub fn bind_loopback() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0")
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// An HTTP client that never uses a proxy and gives up on a request after `timeout`.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("build reqwest client")
}

/// Polls `GET url` until it answers 200, panicking after `timeout`.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    if let Err(e) = wait_http(url, timeout, |s| s == StatusCode::OK, || Ok(())).await {
        panic!("{e}");
    }
}

/// Polls `GET url` until `accept(status)` holds. Before every attempt `alive()` is called; an `Err`
/// from it (e.g. "the server process exited") aborts the wait with that message. Bounded by `timeout`.
pub async fn wait_http(
    url: &str,
    timeout: Duration,
    accept: impl Fn(StatusCode) -> bool,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<StatusCode, String> {
    // Readiness only: a test server's self-signed TLS certificate is fine here.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .danger_accept_invalid_certs(true)
        .build()
        .expect("build reqwest client");
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt made");
    while Instant::now() < deadline {
        alive()?;
        match client.get(url).send().await {
            Ok(resp) if accept(resp.status()) => return Ok(resp.status()),
            Ok(resp) => last = format!("status {}", resp.status()),
            Err(e) => last = format!("error {e}"),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Err(format!(
        "GET {url} not ready after {timeout:?}; last: {last}"
    ))
}

/// Polls `condition` every [`POLL_INTERVAL`] until it holds (`true`) or
/// `timeout` passes (`false`).
pub async fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    true
}
