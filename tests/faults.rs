//! Faults: upstream misbehaviour a real registry cannot be made to produce
//! (a raw-socket stub sends wrong bytes, truncates, lies about length,
//! rate-limits), plus `kill -9` mid-download and a full disk with a real
//! upstream.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use support::images::sha256_digest;
use support::kura::staged_files;
use support::{Kura, KuraOptions, Upstream, seed_all, seed_large};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the stub answers one path.
#[derive(Clone)]
enum Reply {
    /// Status, extra headers, body, and how many body bytes to actually send
    /// before closing (None = all).
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        send_only: Option<usize>,
    },
    /// A Basic challenge (401) unless the request carries `Authorization`,
    /// then the inner reply.
    Challenge(Box<Reply>),
}

impl Reply {
    fn ok(body: &[u8]) -> Self {
        Reply::Raw {
            status: 200,
            headers: vec![("Content-Length".into(), body.len().to_string())],
            body: body.to_vec(),
            send_only: None,
        }
    }
}

/// A registry stub on a raw socket, counting requests per path.
struct Stub {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    async fn start(routes: HashMap<String, Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(routes);
        let task = tokio::spawn({
            let (hits, heads) = (hits.clone(), heads.clone());
            async move {
                while let Ok((socket, _)) = listener.accept().await {
                    tokio::spawn(serve_connection(
                        socket,
                        routes.clone(),
                        hits.clone(),
                        heads.clone(),
                    ));
                }
            }
        });
        Self {
            addr,
            hits,
            heads,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request heads (request line and headers) received so far.
    fn request_heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request per connection (`Connection: close`), which keeps the stub
/// free of HTTP parsing beyond the request line.
async fn serve_connection(
    mut socket: tokio::net::TcpStream,
    routes: Arc<HashMap<String, Reply>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&request);
    let mut parts = text.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    heads.lock().unwrap().push(text.to_string());
    let authorized = text.to_ascii_lowercase().contains("\r\nauthorization:");
    let mut reply = if path == "/v2/" {
        Reply::ok(b"{}")
    } else {
        routes.get(&path).cloned().unwrap_or(Reply::Raw {
            status: 404,
            headers: vec![("Content-Length".into(), "0".into())],
            body: vec![],
            send_only: None,
        })
    };
    let (status, headers, body, send_only) = loop {
        match reply {
            Reply::Challenge(inner) if authorized => reply = *inner,
            Reply::Challenge(_) => {
                let challenge = ("WWW-Authenticate".into(), "Basic realm=\"stub\"".into());
                break (
                    401,
                    vec![challenge, ("Content-Length".into(), "0".into())],
                    vec![],
                    None,
                );
            }
            Reply::Raw {
                status,
                headers,
                body,
                send_only,
            } => break (status, headers, body, send_only),
        }
    };
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = socket.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let sent = send_only.unwrap_or(body.len()).min(body.len());
        let _ = socket.write_all(&body[..sent]).await;
    }
    let _ = socket.shutdown().await;
}

fn client() -> reqwest::Client {
    support::net::http_client(Duration::from_secs(60))
}

/// Fetches a URL to the end; `Err` when the transfer was cut or refused.
async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    let response = client().get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let expected = response.content_length();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    match expected {
        Some(len) if len != body.len() as u64 => {
            Err(format!("short body: {} of {len}", body.len()))
        }
        _ => Ok(body),
    }
}

fn blob_files(cache_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(prefixes) = std::fs::read_dir(cache_dir.join("blobs/sha256")) else {
        return found;
    };
    for prefix in prefixes.flatten() {
        for blob in std::fs::read_dir(prefix.path()).unwrap().flatten() {
            found.push(blob.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_truncated_or_overlong_upstream_blobs_are_never_committed_or_served() {
    let good: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = sha256_digest(&good);
    let mut wrong = good.clone();
    wrong[150_000] ^= 0xff;
    let length = good.len().to_string();
    let cases = [
        (
            "wrong-bytes",
            Reply::Raw {
                status: 200,
                headers: vec![("Content-Length".into(), length.clone())],
                body: wrong.clone(),
                send_only: None,
            },
        ),
        (
            "truncated",
            Reply::Raw {
                status: 200,
                headers: vec![("Content-Length".into(), length.clone())],
                body: good.clone(),
                send_only: Some(good.len() / 2),
            },
        ),
        (
            "length-too-short",
            Reply::Raw {
                status: 200,
                headers: vec![("Content-Length".into(), (good.len() - 10).to_string())],
                body: good.clone(),
                send_only: None,
            },
        ),
        (
            "no-length-wrong-bytes",
            Reply::Raw {
                status: 200,
                headers: vec![],
                body: wrong.clone(),
                send_only: None,
            },
        ),
    ];
    for (label, reply) in cases {
        let path = format!("/v2/stub/app/blobs/{digest}");
        let stub = Stub::start(HashMap::from([(path.clone(), reply)])).await;
        let kura = Kura::start(KuraOptions::new(&stub.url())).await;
        let url = format!("{}{path}", kura.url());
        for attempt in 1..=2 {
            let result = fetch(&url).await;
            assert!(result.is_err(), "{label}: a bad body was served whole");
            assert_eq!(
                stub.hits(&path),
                attempt,
                "{label}: each request fetches again"
            );
        }
        assert!(
            blob_files(kura.cache_dir()).is_empty(),
            "{label}: something was committed"
        );
        assert_eq!(
            staged_files(kura.cache_dir()),
            0,
            "{label}: staging not cleaned"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_are_not_forwarded_on_a_redirect_to_another_host() {
    let body = b"layer bytes served by a CDN".to_vec();
    let digest = sha256_digest(&body);
    let cdn = Stub::start(HashMap::from([("/cdn/blob".to_owned(), Reply::ok(&body))])).await;
    let blob_path = format!("/v2/stub/app/blobs/{digest}");
    let redirect = Reply::Raw {
        status: 307,
        headers: vec![
            ("Location".into(), format!("{}/cdn/blob", cdn.url())),
            ("Content-Length".into(), "0".into()),
        ],
        body: vec![],
        send_only: None,
    };
    let registry = Stub::start(HashMap::from([(
        blob_path.clone(),
        Reply::Challenge(Box::new(redirect)),
    )]))
    .await;
    let mut options = KuraOptions::new(&registry.url());
    options.username = Some("puller".into());
    options.password = Some("redirect-secret".into());
    let kura = Kura::start(options).await;

    let served = fetch(&format!("{}{blob_path}", kura.url())).await.unwrap();
    assert_eq!(sha256_digest(&served), digest);
    let registry_heads = registry.request_heads().join("\n").to_ascii_lowercase();
    assert!(
        registry_heads.contains("authorization: basic"),
        "the registry never got credentials"
    );
    let cdn_heads = cdn.request_heads();
    assert_eq!(cdn_heads.len(), 1);
    assert!(
        !cdn_heads[0].to_ascii_lowercase().contains("authorization"),
        "credentials followed the redirect: {}",
        cdn_heads[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limited_upstream_is_passed_through_and_backed_off() {
    let path = "/v2/stub/app/manifests/v1".to_owned();
    let reply = Reply::Raw {
        status: 429,
        headers: vec![
            ("Retry-After".into(), "30".into()),
            ("Content-Type".into(), "application/json".into()),
            ("Content-Length".into(), "0".into()),
        ],
        body: vec![],
        send_only: None,
    };
    let stub = Stub::start(HashMap::from([(path.clone(), reply)])).await;
    let kura = Kura::start(KuraOptions::new(&stub.url())).await;
    for _ in 0..5 {
        let response = client()
            .get(format!("{}{path}", kura.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=30).contains(&retry_after));
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    }
    assert_eq!(
        stub.hits(&path),
        1,
        "Kura kept asking an upstream that said to back off"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_download_leaves_nothing_servable_and_restart_serves_correctly() {
    let upstream = Upstream::anonymous().await;
    let image = seed_large(&upstream).await;
    let big = image.layers.iter().max_by_key(|b| b.size).unwrap().clone();
    let mut kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        image.repository,
        big.digest
    );

    let response = client().get(&url).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    kura.kill9();
    drop(stream);
    assert!(
        !blob_files(kura.cache_dir()).contains(&big.digest["sha256:".len()..].to_owned()),
        "the blob was committed before the download finished"
    );

    kura.restart().await;
    assert_eq!(
        staged_files(kura.cache_dir()),
        0,
        "staging leftovers survived the restart"
    );
    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        image.repository,
        big.digest
    );
    let body = fetch(&url).await.unwrap();
    assert_eq!(sha256_digest(&body), big.digest);
}

/// Mounts a small tmpfs (needs root, as CI runs) and unmounts it on drop.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        Self { dir }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_still_serves_clients_and_keeps_cached_content() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let large = seed_large(&upstream).await;
    let disk = TinyDisk::mount("32m");
    let mut options = KuraOptions::for_upstream(&upstream);
    options.cache_dir = Some(disk.dir.path().join("cache"));
    let kura = Kura::start(options).await;

    // Small content is cached as usual.
    let small = &seeded.multilayer;
    let small_url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        small.repository,
        small.layers[0].digest
    );
    assert_eq!(
        sha256_digest(&fetch(&small_url).await.unwrap()),
        small.layers[0].digest
    );

    // The large blob cannot fit: it is passed through, verified, not stored.
    let big = large.layers.iter().max_by_key(|b| b.size).unwrap();
    let big_url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        large.repository,
        big.digest
    );
    for _ in 0..2 {
        assert_eq!(sha256_digest(&fetch(&big_url).await.unwrap()), big.digest);
    }
    let range = client()
        .get(&big_url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(range.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.bytes().await.unwrap().len(), 100);
    assert_eq!(staged_files(kura.cache_dir()), 0);
    assert!(!blob_files(kura.cache_dir()).contains(&big.digest["sha256:".len()..].to_owned()));

    // Cached content keeps being served.
    assert_eq!(
        sha256_digest(&fetch(&small_url).await.unwrap()),
        small.layers[0].digest
    );
    assert!(kura.log_text().contains("storage full"));
}
