//! Warming before anyone asks (issue 17), against a real Distribution 2.8:
//! its push notifications warm Kura with no client request; a burst of
//! events for one tag is one fetch; the schedule re-fetches a moved tag on
//! its interval, only the platforms it names, within its hourly budget.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::images::{Flavor, ImageBuild, push_index};
use support::kura::blob_path;
use support::net::{free_port, http_client, loopback, poll_until};
use support::{Kura, KuraOptions, Platform, PushedImage, Upstream, podman_pull, skopeo_copy};

const SECRET: &str = "Bearer warming-test-secret";
/// How long warming may take to land after its trigger.
const LANDS_WITHIN: Duration = Duration::from_secs(20);

fn image(label: &str) -> ImageBuild {
    ImageBuild::synthetic(Flavor::Oci, Platform::linux("amd64", None), label, 2)
}

fn holds(cache_dir: &Path, digests: &BTreeSet<String>) -> bool {
    digests.iter().all(|d| blob_path(cache_dir, d).exists())
}

/// Waits (bounded) until every blob of `image` is in Kura's cache; whether
/// they all landed.
async fn lands(kura: &Kura, image: &PushedImage) -> bool {
    poll_until(LANDS_WITHIN, || {
        holds(kura.cache_dir(), &image.all_digests())
    })
    .await
}

fn holds_any(cache_dir: &Path, digests: &BTreeSet<String>) -> bool {
    digests.iter().any(|d| blob_path(cache_dir, d).exists())
}

/// Kura as the proxy of `upstream`, taking its push events with [`SECRET`].
fn options(upstream_url: &str) -> KuraOptions {
    let mut options = KuraOptions::new(upstream_url);
    options
        .extra_env
        .push(("REGISTRY_PROXY_EVENTS_SECRET".into(), SECRET.into()));
    options
}

async fn status(kura: &Kura) -> Value {
    kura.get_json("/kura/api/v1/warming").await
}

/// Waits (bounded) until no warming job is queued, running or retrying.
async fn wait_queue_empty(kura: &Kura) {
    let deadline = std::time::Instant::now() + LANDS_WITHIN;
    loop {
        let status = status(kura).await;
        if status["queued"] == 0 && status["running"] == 0 && status["retrying"] == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "warming still busy: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_the_upstream_warms_kura_with_no_client_request() {
    let kura_addr = loopback(free_port());
    let events_url = format!("http://{kura_addr}/kura/events/proxy");
    let mut upstream = Upstream::notifying(&events_url, SECRET).await;
    let kura = Kura::start(KuraOptions {
        addr: Some(kura_addr),
        ..options(&upstream.url())
    })
    .await;

    let pushed = image("pushed, then warmed")
        .push(&upstream.client(), "team/app", Some("v1"))
        .await;
    let warmed = lands(&kura, &pushed).await;
    assert!(warmed, "not warmed; status {}", status(&kura).await);
    kura.wait_downloads_settled().await;
    // The job records its outcome a moment after its last blob lands.
    wait_queue_empty(&kura).await;
    let recent = status(&kura).await["recent"].clone();
    assert_eq!(recent[0]["outcome"], "done", "{recent}");
    assert_eq!(recent[0]["origin"], "event", "{recent}");
    assert!(
        !kura.log_text().contains("warming-test-secret"),
        "the secret is never logged"
    );

    upstream.stop();
    let landed = skopeo_copy(
        kura.addr(),
        "team/app:v1",
        &tempfile::tempdir().unwrap().path().join("oci"),
        false,
    );
    assert_eq!(landed.top_digest, pushed.digest);
    assert!(landed.digests.is_superset(&pushed.all_digests()));
    let podman = podman_pull(kura.addr(), "team/app:v1");
    assert_eq!(podman.digest, pushed.digest);
    assert_eq!(podman.diff_ids, pushed.diff_ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_with_a_wrong_secret_are_refused_and_fetch_nothing() {
    let kura_addr = loopback(free_port());
    let events_url = format!("http://{kura_addr}/kura/events/proxy");
    let upstream = Upstream::notifying(&events_url, "Bearer not-the-secret").await;
    let kura = Kura::start(KuraOptions {
        addr: Some(kura_addr),
        ..options(&upstream.url())
    })
    .await;

    let pushed = image("never warmed")
        .push(&upstream.client(), "team/app", Some("v1"))
        .await;
    // The registry delivers (and is refused) within its timeout; then
    // nothing may have been fetched.
    let deadline = std::time::Instant::now() + LANDS_WITHIN;
    while metric(
        &kura.metrics_text().await,
        "kura_warm_events_total{state=\"unauthorized\"}",
    ) < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no refused event seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = http_client(Duration::from_secs(10));
    let body = json!({"events":[{"action":"push","target":{"repository":"team/app","tag":"v1"}}]});
    for authorization in [
        None,
        Some("Bearer not-the-secret"),
        Some("warming-test-secret"),
    ] {
        let mut request = client.post(&events_url).json(&body);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{authorization:?}");
    }
    let unknown = client
        .post(format!(
            "http://{kura_addr}/kura/events/registry.example:5000"
        ))
        .header("authorization", SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!holds_any(kura.cache_dir(), &pushed.all_digests()));
    assert_eq!(upstream.count_requests("GET", "/manifests/"), 0);
    assert_eq!(upstream.count_requests("GET", "/blobs/"), 0);
    assert_eq!(status(&kura).await["recent"], json!([]));
    // Refused deliveries are counted and logged like any request, and the
    // secrets they carried are not.
    assert!(
        kura.metrics_text()
            .await
            .contains("route=\"events\",method=\"other\",status=\"401\"")
    );
    let log = kura.log_text();
    assert!(log.contains("/kura/events/proxy"));
    assert!(!log.contains("not-the-secret") && !log.contains(SECRET));
}

/// One Distribution envelope announcing a push of `repository:tag`.
fn push_event(id: usize, repository: &str, tag: &str, digest: &str) -> Value {
    json!({"events":[{"id": id.to_string(), "action":"push","target":{
        "mediaType":"application/vnd.oci.image.manifest.v1+json","digest":digest,"repository":repository,
        "url":format!("http://upstream/v2/{repository}/manifests/{digest}"),"tag":tag},
        "request":{"host":"upstream","method":"PUT"}}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_events_for_one_tag_are_one_fetch() {
    let upstream = Upstream::anonymous().await;
    let kura = Kura::start(options(&upstream.url())).await;
    let pushed = image("one fetch")
        .push(&upstream.client(), "team/app", Some("v1"))
        .await;
    let harbor = image("from a harbor webhook")
        .push(&upstream.client(), "team/web", Some("v2"))
        .await;

    let client = http_client(Duration::from_secs(30));
    let url = format!("{}/kura/events/proxy", kura.url());
    let posts = (0..100).map(|id| {
        client
            .post(&url)
            .header("authorization", SECRET)
            .header(
                "content-type",
                "application/vnd.docker.distribution.events.v1+json",
            )
            .body(push_event(id, "team/app", "v1", &pushed.digest).to_string())
            .send()
    });
    for response in futures_util::future::join_all(posts).await {
        assert_eq!(response.unwrap().status(), 202);
    }
    let webhook = json!({"type":"PUSH_ARTIFACT","occur_at":1748858645,"operator":"ci-bot","event_data":{
        "resources":[{"digest": harbor.digest, "tag":"v2","resource_url":"harbor.example.net/team/web:v2"}],
        "repository":{"name":"web","namespace":"team","repo_full_name":"team/web","repo_type":"private"}}});
    let response = client
        .post(&url)
        .header("authorization", SECRET)
        .json(&webhook)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.json::<Value>().await.unwrap()["queued"], 1);

    assert!(lands(&kura, &pushed).await);
    assert!(lands(&kura, &harbor).await);
    wait_queue_empty(&kura).await;
    kura.wait_downloads_settled().await;
    assert_eq!(upstream.count_requests("GET", "/v2/team/app/manifests/"), 1);
    for blob in pushed.blob_digests() {
        assert_eq!(
            upstream.count_requests("GET", &format!("/blobs/{blob}")),
            1,
            "{blob}"
        );
    }
    let metrics = kura.metrics_text().await;
    assert!(metric(&metrics, "kura_warm_submissions_total{state=\"coalesced\"}") >= 98.0);

    let too_large = client
        .post(&url)
        .header("authorization", SECRET)
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    // Kura answers the oversized body without reading it and closes that
    // connection: the next request must not try to reuse it.
    let garbage = http_client(Duration::from_secs(10))
        .post(&url)
        .header("authorization", SECRET)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
}

/// Kura with `config` (YAML) in front of `upstream`.
async fn kura_with_config(upstream: &Upstream, config: &str, dir: &Path) -> Kura {
    let path = dir.join("kura.yml");
    std::fs::write(&path, config).unwrap();
    let mut options = KuraOptions::new(&upstream.url());
    options.extra_args.push(path.display().to_string());
    Kura::start(options).await
}

/// The schedule obeys the content policy as clients do: a refused tag is
/// never fetched (nor paid for from the budget), and an immutable tag, once
/// resolved, is not moved when it moves upstream.
#[tokio::test(flavor = "multi_thread")]
async fn the_schedule_fetches_nothing_the_policy_refuses_and_moves_no_immutable_tag() {
    let upstream = Upstream::anonymous().await;
    let pinned = image("pinned, first")
        .push(&upstream.client(), "team/base", Some("1.0"))
        .await;
    let refused = image("refused")
        .push(&upstream.client(), "team/base", Some("nightly"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "proxy:\n  remoteurl: {}\n  warmbudget: 4\n  policy:\n    tags: [\"1.*\"]\n    immutabletags: [\"1.*\"]\n  \
         warm:\n    - repository: team/base\n      references: [\"1.0\", nightly]\n      interval: 2s\n",
        upstream.url()
    );
    let kura = kura_with_config(&upstream, &config, dir.path()).await;
    assert!(lands(&kura, &pinned).await);
    let moved = image("pinned, moved")
        .push(&upstream.client(), "team/base", Some("1.0"))
        .await;
    // Two more ticks of the schedule.
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_queue_empty(&kura).await;
    assert!(
        !holds_any(kura.cache_dir(), &refused.blob_digests()),
        "a refused tag was warmed"
    );
    assert!(
        !holds_any(kura.cache_dir(), &moved.blob_digests()),
        "an immutable tag was moved"
    );
    assert_eq!(
        upstream.count_requests("GET", "/v2/team/base/manifests/nightly"),
        0
    );
    assert_eq!(
        upstream.count_requests("HEAD", "/v2/team/base/manifests/nightly"),
        0
    ); // The refused tag, asked for on every tick, spent none of the budget
    // of four manifest GETs an hour (the pinned tag took two).
    assert!(
        !kura.log_text().contains("(warmbudget) is spent"),
        "a refused reference spent the budget\n{}",
        kura.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schedule_refetches_a_moved_tag_on_its_interval_and_not_before() {
    let upstream = Upstream::anonymous().await;
    let first = image("scheduled, first")
        .push(&upstream.client(), "team/sched", Some("v1"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "proxy:\n  remoteurl: {}\n  warm:\n    - repository: team/sched\n      references: [v1]\n      interval: 8s\n",
        upstream.url()
    );
    let kura = kura_with_config(&upstream, &config, dir.path()).await;

    // The first tick is at startup.
    assert!(lands(&kura, &first).await);
    wait_queue_empty(&kura).await;
    let moved: PushedImage = image("scheduled, moved")
        .push(&upstream.client(), "team/sched", Some("v1"))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !holds_any(kura.cache_dir(), &moved.blob_digests()),
        "fetched before the interval"
    );
    assert_eq!(
        upstream.count_requests("GET", "/v2/team/sched/manifests/"),
        1
    );

    assert!(
        lands(&kura, &moved).await,
        "the moved tag was not fetched on the next interval"
    );
    wait_queue_empty(&kura).await;
    assert_eq!(
        upstream.count_requests("GET", "/v2/team/sched/manifests/"),
        2
    );
    assert!(upstream.count_requests("HEAD", "/v2/team/sched/manifests/v1") >= 2);
    let recent = status(&kura).await["recent"].clone();
    assert_eq!(recent[0]["origin"], "schedule", "{recent}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_platform_rule_fetches_only_that_platform() {
    let upstream = Upstream::anonymous().await;
    let children = [
        ImageBuild::synthetic(
            Flavor::Oci,
            Platform::linux("amd64", None),
            "multi amd64",
            2,
        ),
        ImageBuild::synthetic(
            Flavor::Oci,
            Platform::linux("arm64", None),
            "multi arm64",
            2,
        ),
    ];
    let index = push_index(
        &upstream.client(),
        "team/multi",
        "latest",
        Flavor::Oci,
        &children,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "proxy:\n  remoteurl: {}\n  warm:\n    - repository: team/multi\n      tags: [\"lat*\"]\n      \
         platforms: [linux/amd64]\n      interval: 1h\n",
        upstream.url()
    );
    let kura = kura_with_config(&upstream, &config, dir.path()).await;
    let amd64 = index.child("amd64");
    let arm64 = index.child("arm64");
    assert!(lands(&kura, amd64).await);
    wait_queue_empty(&kura).await;
    kura.wait_downloads_settled().await;

    assert_eq!(
        upstream.count_requests("GET", "/v2/team/multi/tags/list"),
        1
    );
    assert_eq!(
        upstream.count_requests("GET", "/v2/team/multi/manifests/latest"),
        1
    );
    assert_eq!(
        upstream.count_requests("GET", &format!("/manifests/{}", amd64.digest)),
        1
    );
    for digest in arm64.all_digests() {
        assert_eq!(
            upstream.count_requests("GET", &digest),
            0,
            "arm64 {digest} fetched"
        );
        assert!(!blob_path(kura.cache_dir(), &digest).exists());
    }
    for blob in amd64.blob_digests() {
        assert_eq!(upstream.count_requests("GET", &format!("/blobs/{blob}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hourly_budget_stops_the_schedules_gets() {
    const BUDGET: usize = 3;
    let upstream = Upstream::anonymous().await;
    for tag in ["a", "b", "c", "d"] {
        image(&format!("budget {tag}"))
            .push(&upstream.client(), "team/budget", Some(tag))
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "proxy:\n  remoteurl: {}\n  warmbudget: {BUDGET}\n  warm:\n    - repository: team/budget\n      \
         references: [a, b, c, d]\n      interval: 2s\nwarming:\n  workers: 1\n",
        upstream.url()
    );
    let kura = kura_with_config(&upstream, &config, dir.path()).await;
    let spent = poll_until(LANDS_WITHIN, || {
        kura.log_text()
            .contains("manifest GETs (warmbudget) is spent")
    })
    .await;
    assert!(spent, "the budget never ran out");
    wait_queue_empty(&kura).await;
    let gets = upstream.count_requests("GET", "/manifests/");
    assert!((1..=BUDGET).contains(&gets), "{gets} manifest GETs");
    // Three more intervals: the schedule still ticks, and sends no GET.
    tokio::time::sleep(Duration::from_secs(6)).await;
    wait_queue_empty(&kura).await;
    assert_eq!(upstream.count_requests("GET", "/manifests/"), gets);
    let recent = status(&kura).await["recent"].clone();
    let reasons: Vec<&str> = recent
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("warmbudget")), "{recent}");
}
