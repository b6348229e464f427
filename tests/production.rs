//! What an operator relies on in production: TLS, client authentication,
//! metrics, health endpoints, logs free of secrets, and a clean SIGTERM.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use support::images::sha256_digest;
use support::process::{require_tool, run_tool};
use support::{Kura, KuraOptions, StallingUpstream, Upstream, seed_all, seed_large};

fn write(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files.
struct TestPki {
    ca_pem: String,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

impl TestPki {
    fn generate(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Kura test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            cert_path: write(dir, "server.pem", &server_cert.pem()),
            key_path: write(dir, "server-key.pem", &server_key.serialize_pem()),
        }
    }
}

fn kura_with_config(upstream: &Upstream, config_path: &Path) -> KuraOptions {
    let mut options = KuraOptions::for_upstream(upstream);
    options.extra_args.push(config_path.display().to_string());
    options
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_over_verified_tls_and_http2_is_offered() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let config = write(
        dir.path(),
        "kura.yml",
        &format!(
            "http:\n  tls:\n    certificate: {}\n    key: {}\n",
            pki.cert_path.display(),
            pki.key_path.display()
        ),
    );
    let mut options = kura_with_config(&upstream, &config);
    options.tls = true;
    let kura = Kura::start(options).await;

    let cert_dir = dir.path().join("certs");
    std::fs::create_dir(&cert_dir).unwrap();
    write(&cert_dir, "ca.crt", &pki.ca_pem);
    let image = &seeded.multilayer;
    let dest = dir.path().join("pulled");
    let mut skopeo = Command::new(require_tool("skopeo"));
    skopeo
        .args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
        .arg("--src-tls-verify=true")
        .arg("--src-cert-dir")
        .arg(&cert_dir)
        .arg(format!("docker://{}/{}", kura.addr(), image.reference()))
        .arg(format!("oci:{}:latest", dest.display()));
    let output = run_tool(skopeo, Duration::from_secs(120));
    assert!(
        output.success(),
        "skopeo over TLS failed: {}",
        output.stderr
    );
    let landed = support::clients::landed_content(&dest);
    assert_eq!(landed.top_digest, image.digest);

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/v2/", kura.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN should pick HTTP/2"
    );
    // Without the CA, verification fails: the certificate really is checked.
    assert!(reqwest::get(format!("{}/v2/", kura.url())).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_protects_the_registry_api_but_not_health() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("let-me-in", 6).unwrap();
    let htpasswd = write(dir.path(), "htpasswd", &format!("alice:{hash}\n"));
    let config = write(
        dir.path(),
        "kura.yml",
        &format!(
            "auth:\n  htpasswd:\n    realm: kura-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let kura = Kura::start(kura_with_config(&upstream, &config)).await;
    let client = support::net::http_client(Duration::from_secs(30));
    let manifest = format!(
        "{}/v2/{}/manifests/latest",
        kura.url(),
        seeded.multilayer.repository
    );

    for (credentials, expected) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(("alice", "wrong")), StatusCode::UNAUTHORIZED),
        (Some(("mallory", "let-me-in")), StatusCode::UNAUTHORIZED),
        (Some(("alice", "let-me-in")), StatusCode::OK),
    ] {
        let mut request = client.get(&manifest);
        if let Some((user, password)) = credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), expected, "{credentials:?}");
        if expected == StatusCode::UNAUTHORIZED {
            assert_eq!(
                response.headers()["www-authenticate"],
                "Basic realm=\"kura-test\""
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
        }
    }
    for open in ["/healthz", "/readyz", "/metrics"] {
        let response = client
            .get(format!("{}{open}", kura.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{open}");
    }

    let dest = dir.path().join("pulled");
    let mut skopeo = Command::new(require_tool("skopeo"));
    skopeo
        .args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
        .args(["--src-tls-verify=false", "--src-creds", "alice:let-me-in"])
        .arg(format!(
            "docker://{}/{}",
            kura.addr(),
            seeded.multilayer.reference()
        ))
        .arg(format!("oci:{}:latest", dest.display()));
    let output = run_tool(skopeo, Duration::from_secs(120));
    assert!(
        output.success(),
        "skopeo with credentials failed: {}",
        output.stderr
    );
    assert!(!kura.log_text().contains("let-me-in"));
}

/// The value of the first sample of `name` whose labels contain every
/// `key="value"` in `labels`; 0 when absent.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

async fn scrape(kura: &Kura) -> String {
    reqwest::get(format!("{}/metrics", kura.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_from_misses_to_hits_and_health_answers() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let image = &seeded.multilayer;
    let blobs = (image.layers.len() + 1) as f64;
    let bytes = image.blob_bytes() as f64;

    let before = scrape(&kura).await;
    assert!(
        before.contains("# TYPE kura_http_requests counter"),
        "{before}"
    );
    assert!(kura.pull(image).await);
    let cold = scrape(&kura).await;
    let blob_misses = r#"kind="blob""#;
    assert_eq!(
        sample(
            &cold,
            "kura_cache_lookups_total",
            &[blob_misses, r#"outcome="miss""#]
        ),
        blobs
    );
    assert_eq!(
        sample(
            &cold,
            "kura_cache_lookups_total",
            &[blob_misses, r#"outcome="hit""#]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &cold,
            "kura_blob_bytes_served_total",
            &[r#"source="download""#]
        ),
        bytes
    );
    assert_eq!(
        sample(
            &cold,
            "kura_upstream_bytes_fetched_total",
            &[r#"upstream="proxy""#]
        ),
        bytes
    );
    assert!(sample(&cold, "kura_upstream_requests_total", &[r#"status="200""#]) >= blobs);

    kura.wait_downloads_settled().await;
    assert!(kura.pull(image).await);
    let warm = scrape(&kura).await;
    assert_eq!(
        sample(
            &warm,
            "kura_cache_lookups_total",
            &[blob_misses, r#"outcome="hit""#]
        ),
        blobs
    );
    assert_eq!(
        sample(
            &warm,
            "kura_blob_bytes_served_total",
            &[r#"source="cache""#]
        ),
        bytes
    );
    assert_eq!(
        sample(
            &warm,
            "kura_upstream_bytes_fetched_total",
            &[r#"upstream="proxy""#]
        ),
        bytes
    );
    assert!(
        sample(
            &warm,
            "kura_http_request_duration_seconds_count",
            &[r#"route="blob""#]
        ) >= 2.0 * blobs
    );

    let health = reqwest::get(format!("{}/healthz", kura.url()))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = reqwest::get(format!("{}/readyz", kura.url()))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["storage"], "writable");
    assert_eq!(body["upstreams"]["proxy"], "reachable");
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_of_authenticated_pulls_hold_no_password_or_token() {
    for upstream in [
        Upstream::htpasswd("puller", "htpasswd-pw-3141").await,
        Upstream::token("puller", "token-pw-2718").await,
    ] {
        let seeded = seed_all(&upstream).await;
        let mut options = KuraOptions::for_upstream(&upstream);
        options.extra_env.push(("RUST_LOG".into(), "debug".into()));
        let kura = Kura::start(options).await;
        assert!(kura.pull(&seeded.multilayer).await);
        let log = kura.log_text();
        let (_, password) = upstream.credentials().unwrap();
        assert!(log.contains("kura::access"), "the access log is on");
        assert!(!log.contains(password), "password in log");
        // JWTs start with a base64url `{"` header; Basic credentials encode user:password.
        assert!(!log.contains("eyJ"), "a token reached the log");
        assert!(
            !log.to_lowercase().contains("authorization: "),
            "an Authorization header was logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_pull_leaves_no_staging_and_restart_serves() {
    let upstream = Upstream::anonymous().await;
    let large = seed_large(&upstream).await;
    let mut options = KuraOptions::for_upstream(&upstream);
    options
        .extra_env
        .push(("REGISTRY_HTTP_DRAINTIMEOUT".into(), "1s".into()));
    let mut kura = Kura::start(options).await;
    let big = large.layers.iter().max_by_key(|b| b.size).unwrap().clone();
    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        large.repository,
        big.digest
    );

    // A slow client: reads one chunk, then stalls while Kura is told to stop.
    let response = reqwest::get(&url).await.unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    assert!(
        kura.terminate(Duration::from_secs(15)).await,
        "Kura did not exit after SIGTERM"
    );
    drop(stream);
    let staging = support::kura::staging_dirs(kura.cache_dir());
    assert!(
        staging.is_empty(),
        "staging left after SIGTERM: {staging:?}"
    );
    assert!(kura.log_text().contains("shutting down"));

    kura.restart().await;
    let url = format!(
        "{}/v2/{}/blobs/{}",
        kura.url(),
        large.repository,
        big.digest
    );
    let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), big.digest);
}

/// Credentials inside a `remoteurl` would be printed wherever the URL is
/// (`config check`, the startup log): refused, with the key named and the
/// password never repeated.
#[test]
fn credentials_in_a_remote_url_are_refused_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let listed = write(
        dir.path(),
        "upstreams.yml",
        "upstreams:\n  - name: ghcr.io\n    remoteurl: https://me:hunter2@ghcr.io\n",
    );
    let kura = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kura"));
        command
            .args(args)
            .env("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", dir.path())
            .envs(env.iter().copied());
        run_tool(command, Duration::from_secs(30))
    };
    let inline = [("REGISTRY_PROXY_REMOTEURL", "https://me:hunter2@127.0.0.1:1")];
    let attempts = [
        ("proxy.remoteurl", kura(&["config", "check"], &inline)),
        (
            "proxy.remoteurl",
            kura(&["serve", "--listen", "127.0.0.1:0"], &inline),
        ),
        (
            "remoteurl",
            kura(&["config", "check", &listed.display().to_string()], &[]),
        ),
    ];
    for (key, output) in attempts {
        let printed = format!("{}{}", output.stdout, output.stderr);
        assert!(!output.success(), "accepted: {printed}");
        assert!(printed.contains(key), "{printed}");
        assert!(printed.contains("username and password"), "{printed}");
        assert!(!printed.contains("hunter2"), "password printed: {printed}");
    }
}

/// Docker Hub's allowance headers become gauges, and a tag revalidated by
/// HEAD (`tagttl: 0`) spends no counted pull: only manifest GETs count.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_rate_limit_headers_become_gauges_and_heads_are_not_counted_pulls() {
    use support::stalling::{RATE_LIMIT, RATE_WINDOW};
    let stub = StallingUpstream::start();
    let mut options = KuraOptions::new(&stub.url());
    options.extra_env = vec![("REGISTRY_PROXY_TAGTTL".into(), "0".into())];
    let kura = Kura::start(options).await;
    let manifest = format!("{}/v2/limited/app/manifests/latest", kura.url());
    let get_manifest = || async {
        let response = reqwest::get(&manifest).await.expect("manifest answered");
        assert_eq!(response.status(), StatusCode::OK);
    };

    get_manifest().await;
    let cold = scrape(&kura).await;
    let upstream = r#"upstream="proxy""#;
    let gauge = |text: &str, name: &str| sample(text, name, &[upstream]);
    assert_eq!(
        gauge(&cold, "kura_upstream_ratelimit_limit"),
        f64::from(RATE_LIMIT)
    );
    assert_eq!(
        gauge(&cold, "kura_upstream_ratelimit_remaining"),
        f64::from(RATE_LIMIT - 1)
    );
    assert_eq!(
        gauge(&cold, "kura_upstream_ratelimit_window_seconds"),
        f64::from(RATE_WINDOW)
    );
    let counted = |text: &str, method: &str| {
        sample(
            text,
            "kura_upstream_manifest_requests_total",
            &[upstream, &format!(r#"method="{method}""#)],
        )
    };
    assert_eq!(counted(&cold, "GET"), 1.0, "{cold}");

    get_manifest().await;
    get_manifest().await;
    let warm = scrape(&kura).await;
    assert_eq!(
        counted(&warm, "GET"),
        1.0,
        "revalidation spent a pull: {warm}"
    );
    assert_eq!(
        counted(&warm, "HEAD") - counted(&cold, "HEAD"),
        2.0,
        "one HEAD per revalidation: {warm}"
    );
    assert_eq!(stub.hits("GET", "/v2/limited/app/manifests/latest"), 1);
    assert_eq!(
        gauge(&warm, "kura_upstream_ratelimit_remaining"),
        f64::from(RATE_LIMIT - 1),
        "a HEAD does not lower the allowance"
    );
}
