//! Production traffic that used to knock Kura over, each at a scale these
//! machines run in seconds: a storm of distinct cold blobs against an
//! upstream that never answers, clients that give up on manifest fetches
//! while the upstream is slow, blob bodies that trickle, answers too large
//! to hold. After each, Kura must still serve what it has cached, promptly,
//! and hold no upstream slot, download or staging file.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::images::sha256_digest;
use support::{Kura, KuraOptions, StallingUpstream};

/// How soon a cached answer or a readiness probe must come, even mid-storm.
const PROMPT: Duration = Duration::from_secs(5);

async fn start_kura(stub: &StallingUpstream, settings: &[(&str, &str)]) -> Kura {
    let mut options = KuraOptions::new(&stub.url());
    options.extra_env = settings
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    Kura::start(options).await
}

fn client(timeout: Duration) -> reqwest::Client {
    support::net::http_client(timeout)
}

/// Pulls `ok/app:latest` (manifest, config, layer) and checks every digest.
async fn pull_known_image(kura: &Kura, stub: &StallingUpstream) {
    pull_image(kura, stub, "ok/app").await;
}

/// Pulls the stub's image from `repository` (under `ok/`), checking every
/// digest.
async fn pull_image(kura: &Kura, stub: &StallingUpstream, repository: &str) {
    let client = client(PROMPT);
    let manifest = client
        .get(format!("{}/v2/{repository}/manifests/latest", kura.url()))
        .send()
        .await
        .expect("manifest answered promptly");
    assert_eq!(manifest.status(), StatusCode::OK);
    let bytes = manifest.bytes().await.expect("manifest body");
    assert_eq!(sha256_digest(&bytes), stub.image().manifest_digest);
    for (digest, expected) in stub.image().blobs() {
        let url = format!("{}/v2/{repository}/blobs/{digest}", kura.url());
        let response = client.get(url).send().await.expect("blob answered");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.bytes().await.expect("blob body"), expected);
    }
}

async fn assert_ready(kura: &Kura) {
    let started = Instant::now();
    let response = client(PROMPT)
        .get(format!("{}/readyz", kura.url()))
        .send()
        .await
        .expect("/readyz answered promptly");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() < PROMPT);
}

/// The value of a metric series (`name{labels}` as exposed), 0 if absent.
async fn metric(kura: &Kura, series: &str) -> f64 {
    kura.metrics_text()
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Once traffic is over: no slot held, no download running or queued,
/// nothing left in staging.
async fn assert_idle(kura: &Kura) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut busy = Vec::new();
        for series in [
            "kura_upstream_slots_in_use{upstream=\"proxy\",kind=\"metadata\"}",
            "kura_upstream_slots_in_use{upstream=\"proxy\",kind=\"body\"}",
            "kura_downloads_in_flight",
            "kura_downloads_waiting",
        ] {
            let value = metric(kura, series).await;
            if value != 0.0 {
                busy.push(format!("{series} = {value}"));
            }
        }
        let staged = support::kura::staged_files(kura.cache_dir());
        if staged != 0 {
            busy.push(format!("{staged} staging files"));
        }
        if busy.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still busy when idle: {busy:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lets this process hold the storm's sockets (the usual soft limit is
/// 1,024 descriptors).
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            ..limit
        },
    )
    .expect("raise RLIMIT_NOFILE");
}

fn random_digest(i: usize) -> String {
    sha256_digest(format!("cold blob {i} {:?}", Instant::now()).as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_distinct_cold_blobs_against_a_hung_upstream_leaves_the_cache_serving() {
    raise_open_file_limit();
    let stub = StallingUpstream::start();
    let kura = start_kura(
        &stub,
        &[
            ("REGISTRY_PROXY_RESPONSETIMEOUT", "1s"),
            ("REGISTRY_CACHE_DOWNLOADWAIT", "3s"),
            // Every storm request gets its own connection: this is about
            // downloads, not the connection limit (tests/limits.rs).
            ("REGISTRY_HTTP_MAXCONNECTIONS", "2048"),
        ],
    )
    .await;
    pull_known_image(&kura, &stub).await;

    const STORM: usize = 1200;
    let storm_client = client(Duration::from_secs(60));
    let storm: Vec<_> = (0..STORM)
        .map(|i| {
            let url = format!("{}/v2/hang/app/blobs/{}", kura.url(), random_digest(i));
            let client = storm_client.clone();
            tokio::spawn(async move {
                match client.get(url).send().await {
                    Ok(response) => Some((
                        response.status(),
                        response.headers().contains_key("retry-after"),
                    )),
                    Err(_) => None,
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Mid-storm: what is cached is served, and readiness answers.
    pull_known_image(&kura, &stub).await;
    assert_ready(&kura).await;

    let mut answers = HashMap::new();
    for request in storm {
        let answer = request.await.unwrap();
        *answers.entry(answer).or_insert(0usize) += 1;
    }
    let unanswered = answers.get(&None).copied().unwrap_or(0);
    assert_eq!(unanswered, 0, "every storm request answered: {answers:?}");
    let told_to_retry = answers
        .iter()
        .filter(|(answer, _)| *answer == &Some((StatusCode::SERVICE_UNAVAILABLE, true)))
        .map(|(_, n)| n)
        .sum::<usize>();
    assert!(
        told_to_retry > 0,
        "requests beyond capacity get 503 with Retry-After: {answers:?}"
    );
    assert!(
        answers
            .keys()
            .all(|answer| matches!(answer, Some((StatusCode::SERVICE_UNAVAILABLE, _)))),
        "{answers:?}"
    );

    pull_known_image(&kura, &stub).await;
    assert_ready(&kura).await;
    assert_idle(&kura).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn manifest_fetches_whose_clients_gave_up_return_their_upstream_slots() {
    let stub = StallingUpstream::start();
    let kura = start_kura(&stub, &[("REGISTRY_PROXY_MAXCONNECTIONS", "2")]).await;
    let impatient = client(Duration::from_millis(200));
    for repository in ["slow/a", "slow/b"] {
        let url = format!("{}/v2/{repository}/manifests/latest", kura.url());
        assert!(
            impatient.get(url).send().await.is_err(),
            "the client gives up first"
        );
    }
    // Both slots are taken by fetches nobody waits for; they finish on
    // their own and free them for the next request.
    pull_known_image(&kura, &stub).await;
    // The abandoned fetches completed and cached what they fetched.
    for repository in ["slow/a", "slow/b"] {
        let started = Instant::now();
        let url = format!("{}/v2/{repository}/manifests/latest", kura.url());
        let response = client(PROMPT).get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(started.elapsed() < support::stalling::SLOW_DELAY);
        let path = format!("/v2/{repository}/manifests/latest");
        assert_eq!(stub.hits("GET", &path), 1, "fetched once, then cached");
    }
    assert_ready(&kura).await;
    assert_idle(&kura).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trickling_blob_bodies_do_not_starve_manifests() {
    let stub = StallingUpstream::start();
    let kura = start_kura(
        &stub,
        &[
            ("REGISTRY_CACHE_MAXDOWNLOADS", "64"),
            ("REGISTRY_PROXY_IDLETIMEOUT", "6s"),
        ],
    )
    .await;
    pull_known_image(&kura, &stub).await;
    let patient = client(Duration::from_secs(120));
    let requests: Vec<_> = (0..32)
        .map(|i| {
            let url = format!("{}/v2/trickle/app/blobs/{}", kura.url(), random_digest(i));
            let client = patient.clone();
            tokio::spawn(async move { client.get(url).send().await })
        })
        .collect();
    let mut trickling = Vec::new();
    for request in requests {
        if let Ok(response) = request.await.unwrap()
            && response.status() == StatusCode::OK
        {
            trickling.push(response);
        }
    }
    // Every body slot the upstream allows is busy trickling (the rest of
    // the 32 were told to come back); a manifest not cached yet still gets
    // through.
    assert!(
        trickling.len() >= 16,
        "{} bodies trickling",
        trickling.len()
    );
    pull_image(&kura, &stub, "ok/other").await;
    assert_ready(&kura).await;
    // A byte every 100 ms never looks idle, but is far too slow to keep:
    // the trickles are given up within a window, their slots returned.
    drop(trickling);
    assert_idle(&kura).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_answers_too_large_to_hold_are_refused_with_a_clear_error() {
    let stub = StallingUpstream::start();
    let kura = start_kura(&stub, &[]).await;
    let client = client(Duration::from_secs(30));
    let manifest = client
        .get(format!("{}/v2/big/app/manifests/latest", kura.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = manifest.text().await.unwrap();
    assert!(
        body.contains("UNAVAILABLE") && body.contains("manifest larger than 4096 KiB"),
        "{body}"
    );
    let tags = client
        .get(format!("{}/v2/big/app/tags/list", kura.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(tags.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = tags.text().await.unwrap();
    assert!(body.contains("tag list larger than"), "{body}");
    pull_known_image(&kura, &stub).await;
    assert_ready(&kura).await;
}

/// A rollout's first requests for one repository, all at once, against a
/// token-protected Distribution: one token fetch for the repository, and
/// one upstream HEAD per blob, however many clients ask.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_first_requests_share_one_token_and_one_head_per_blob() {
    let upstream = support::Upstream::token("alice", "s3cret").await;
    let seeded = support::seed_all(&upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let client = client(Duration::from_secs(30));
    // Kura learns the upstream's scheme from its first challenge.
    let learn = format!(
        "{}/v2/{}/manifests/latest",
        kura.url(),
        seeded.oci_index.repository
    );
    assert_eq!(
        client.get(learn).send().await.unwrap().status(),
        StatusCode::OK
    );

    let seen_before = upstream.requests().len();
    let issuer = upstream.token_issuer().expect("a token upstream");
    let tokens_before = issuer.tokens_issued();
    let image = &seeded.multilayer;
    let layer = &image.layers[0].digest;
    let url = format!("{}/v2/{}/blobs/{layer}", kura.url(), image.repository);
    // The upstream holds its answers until every client has asked.
    upstream.pause();
    let heads: Vec<_> = (0..32)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.head(url).send().await.map(|r| r.status()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    upstream.resume();
    for head in heads {
        assert_eq!(head.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(
        issuer.tokens_issued() - tokens_before,
        1,
        "one token for the repository"
    );
    let asked = upstream.requests().split_off(seen_before);
    let heads = asked
        .iter()
        .filter(|r| r.method == "HEAD" && r.uri.ends_with(&format!("/blobs/{layer}")))
        .count();
    assert_eq!(heads, 1, "one upstream HEAD for the blob: {asked:?}");
}
