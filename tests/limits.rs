//! Client connections cannot exhaust Kura (issue 12, items 5 and 6):
//! half-sent requests are closed after `http.timeouts.header`, connections
//! past `http.maxconnections` wait until a slot frees, a silent reader is
//! cut after `http.timeouts.idle` while a slow one is not, and made-up HTTP
//! methods do not grow `/metrics`. Through all of it a cached image and
//! `/readyz` keep answering promptly.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::images::sha256_digest;
use support::net::{free_port, http_client, loopback};
use support::{Kura, KuraOptions, PushedImage, Upstream, seed_all};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long "promptly" is for a cached pull or a readiness probe on a
/// loaded two-core machine.
const PROMPTLY: Duration = Duration::from_secs(5);

fn with_env(upstream: &Upstream, env: &[(&str, &str)]) -> KuraOptions {
    let mut options = KuraOptions::for_upstream(upstream);
    for (key, value) in env {
        options.extra_env.push((key.to_string(), value.to_string()));
    }
    options
}

/// Kura with `env`, and a seeded image already pulled once, so it is cached.
async fn kura_with_cached_image(env: &[(&str, &str)]) -> (Upstream, Kura, PushedImage) {
    let upstream = Upstream::anonymous().await;
    let image = seed_all(&upstream).await.multilayer;
    let kura = Kura::start(with_env(&upstream, env)).await;
    assert!(kura.pull(&image).await, "cold pull failed");
    (upstream, kura, image)
}

/// The cached image is served and `/readyz` answers, each within [`PROMPTLY`].
async fn assert_still_serving(kura: &Kura, image: &PushedImage, when: &str) {
    let pulled = tokio::time::timeout(PROMPTLY, kura.pull(image)).await;
    assert!(
        matches!(pulled, Ok(true)),
        "{when}: cached image not served promptly"
    );
    let ready = tokio::time::timeout(
        PROMPTLY,
        http_client(PROMPTLY)
            .get(format!("{}/readyz", kura.url()))
            .send(),
    )
    .await;
    let status = ready.ok().and_then(Result::ok).map(|r| r.status());
    assert_eq!(
        status,
        Some(reqwest::StatusCode::OK),
        "{when}: /readyz did not answer promptly"
    );
}

/// Reads until the peer closes; `true` if it did before `deadline`.
async fn closed_by(stream: &mut TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn connect(addr: SocketAddr, send: &'static [u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect to kura");
    stream.write_all(send).await.expect("send");
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_requests_and_silent_connections_are_closed_after_the_header_timeout() {
    let (_upstream, kura, image) =
        kura_with_cached_image(&[("REGISTRY_HTTP_TIMEOUTS_HEADER", "2s")]).await;

    let mut attackers = Vec::new();
    for _ in 0..300 {
        attackers.push(connect(kura.addr(), b"GET /v2/ HT").await);
    }
    for _ in 0..20 {
        attackers.push(connect(kura.addr(), b"").await);
    }
    let sent = tokio::time::Instant::now();
    assert_still_serving(&kura, &image, "while 320 connections stall").await;

    // 2 s of header timeout, and a generous margin for a busy machine.
    let deadline = sent + Duration::from_secs(10);
    let mut still_open = 0;
    for stream in &mut attackers {
        if !closed_by(stream, deadline).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "stalled connections still open 10 s later");
    assert_still_serving(&kura, &image, "after the stalled connections").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_wait_until_a_slot_frees() {
    let debug = loopback(free_port());
    let debug_addr = debug.to_string();
    let (_upstream, kura, image) = kura_with_cached_image(&[
        ("REGISTRY_HTTP_MAXCONNECTIONS", "4"),
        ("REGISTRY_HTTP_DEBUG_ADDR", &debug_addr),
    ])
    .await;
    // reqwest's pool from the warm-up pull is gone with its client; these
    // four take every slot and keep it (the header timeout is 20 s).
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(connect(kura.addr(), b"").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut queued = connect(kura.addr(), b"GET /healthz HTTP/1.1\r\nHost: kura\r\n\r\n").await;
    let mut head = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_secs(2), queued.read(&mut head)).await;
    assert!(early.is_err(), "a connection past the limit was served");
    // The debug listener has its own slots: probes there still get in.
    let probe = http_client(PROMPTLY)
        .get(format!("http://{debug}/readyz"))
        .send()
        .await
        .expect("debug listener answers while the main one is full");
    assert_eq!(probe.status(), reqwest::StatusCode::OK);

    drop(holders);
    let served = tokio::time::timeout(PROMPTLY, queued.read_exact(&mut head)).await;
    assert!(
        matches!(served, Ok(Ok(_))),
        "the queued connection was not served once slots freed"
    );
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(queued);
    assert_still_serving(&kura, &image, "after the limit was reached").await;
}

/// A 32 MiB blob, larger than every buffer between Kura and a client.
fn large_blob() -> Bytes {
    (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Sends a GET for `path` and reads the response head; returns the stream
/// positioned at the body and the bytes of the body already read.
async fn get_raw(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: kura\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response head");
        received.extend_from_slice(&buf[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(received.starts_with(b"HTTP/1.1 200"), "not a 200");
            return (stream, received.split_off(end + 4));
        }
    }
}

/// Reads the rest of the stream quickly (bounded by `limit`).
async fn read_rest(stream: &mut TcpStream, body: &mut Vec<u8>, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reader_completes_while_a_silent_one_is_cut_after_the_idle_timeout() {
    let idle = Duration::from_secs(3);
    let (upstream, kura, image) =
        kura_with_cached_image(&[("REGISTRY_HTTP_TIMEOUTS_IDLE", "3s")]).await;
    let blob = large_blob();
    let digest = upstream.client().push_blob("big/idle", blob.clone()).await;
    let path = format!("/v2/big/idle/blobs/{digest}");
    let warm = http_client(Duration::from_secs(60))
        .get(format!("{}{path}", kura.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(warm.len(), blob.len(), "warm-up download");

    let (mut silent, mut silent_body) = get_raw(kura.addr(), &path).await;
    let (mut slow, mut slow_body) = get_raw(kura.addr(), &path).await;
    // Both clients fill every buffer on the way within a moment; the slow
    // one then takes 16 KiB every 250 ms for well past the idle timeout,
    // far too little for Kura's next write to go through in that time.
    let slow_until = Instant::now() + idle * 3;
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < slow_until {
        let n = slow.read(&mut buf).await.expect("slow reader cut");
        assert!(n > 0, "slow reader cut after {} bytes", slow_body.len());
        slow_body.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    read_rest(&mut slow, &mut slow_body, Duration::from_secs(20)).await;
    assert_eq!(slow_body.len(), blob.len(), "slow reader's body incomplete");
    assert_eq!(sha256_digest(&slow_body), digest);

    // The silent client has read nothing for 9 s: Kura has let it go, so
    // draining it now yields what the buffers held, not the whole blob.
    read_rest(&mut silent, &mut silent_body, Duration::from_secs(20)).await;
    assert!(
        silent_body.len() < blob.len(),
        "a client that read nothing for 9 s was still being served"
    );
    assert_still_serving(&kura, &image, "after the slow and silent readers").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_do_not_grow_metrics() {
    let (_upstream, kura, image) = kura_with_cached_image(&[]).await;
    let client = http_client(PROMPTLY);
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        client
            .request(method, format!("{}/v2/", kura.url()))
            .send()
            .await
            .expect("Kura answers a made-up method");
    }
    let metrics = kura.metrics_text().await;
    assert!(!metrics.contains("MADEUP"), "a made-up method is a label");
    let request_series = metrics
        .lines()
        .filter(|line| line.starts_with("kura_http_requests_total{"))
        .count();
    assert!(
        request_series < 20,
        "{request_series} request series:\n{metrics}"
    );
    assert!(metrics.contains(r#"method="other""#), "{metrics}");
    assert_still_serving(&kura, &image, "after 200 made-up methods").await;
}
