//! Replicas of one bucket acting as one cache (`cluster:`): one garbage
//! collector, and one upstream fetch per cold blob cluster-wide (moto's
//! server as the bucket, Distribution as the upstream).

mod support;

use std::time::{Duration, Instant};

use support::images::{one_layer_image, sha256_digest};
use support::net::{free_port, http_client, loopback};
use support::s3::S3Server;
use support::{Kura, KuraOptions, PushedImage, Upstream};
use tempfile::TempDir;

const SECRET: &str = "cluster-test-secret-0123456789";

/// A replica in the cluster of `s3`'s bucket, its address advertised to
/// its peers; `cluster` adds keys under `cluster:` (indented two spaces).
async fn replica(
    s3: &S3Server,
    upstream: &Upstream,
    cluster: &str,
    env: &[(&str, &str)],
) -> (Kura, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let addr = loopback(free_port());
    let yaml = s3.storage_yaml(&dir.path().join("local"))
        + &format!(
            "cluster:\n  advertise: http://{addr}\n  secret: {SECRET}\n  heartbeat: 1s\n  expiry: 3s\n{cluster}"
        );
    let config = dir.path().join("kura.yml");
    std::fs::write(&config, yaml).unwrap();
    let mut options = KuraOptions::for_upstream(upstream);
    options.addr = Some(addr);
    options.extra_args.push(config.display().to_string());
    for (key, value) in env {
        options.extra_env.push((key.to_string(), value.to_string()));
    }
    (Kura::start(options).await, dir)
}

/// Waits (20 s at most) until every replica sees all of them live.
async fn wait_for_each_other(replicas: &[&Kura]) {
    let expected = format!("kura_cluster_replicas {}", replicas.len());
    for kura in replicas {
        wait_for_metric(kura, &expected).await;
    }
}

/// Waits (20 s at most) until `kura`'s metrics hold `line`.
async fn wait_for_metric(kura: &Kura, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kura.metrics_text().await.lines().any(|l| l == line) {
        assert!(
            Instant::now() < deadline,
            "{} never showed {line}\n{}",
            kura.url(),
            kura.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id a replica joined the cluster with, from its log.
fn replica_id(kura: &Kura) -> String {
    let log = kura.log_text();
    let line = log
        .lines()
        .find(|line| line.contains("cluster: joining"))
        .expect("a join line in the log");
    let id = line.split("id=").nth(1).expect("an id field");
    id.split_whitespace().next().unwrap().to_owned()
}

/// The replica that owns `key` by the owner rule.
fn owner_of<'a>(replicas: &[&'a Kura], key: &str) -> &'a Kura {
    let ids: Vec<String> = replicas.iter().map(|kura| replica_id(kura)).collect();
    let owner = kura::cluster::owner::owner(ids.iter().map(String::as_str), key.as_bytes())
        .expect("an owner");
    let index = ids.iter().position(|id| id == owner).unwrap();
    replicas[index]
}

async fn push(upstream: &Upstream, repository: &str, size: usize, seed: u64) -> PushedImage {
    one_layer_image(size, seed)
        .push(&upstream.client(), repository, Some("latest"))
        .await
}

/// A pull as a client does it (manifest by tag, then config and layers,
/// redirects followed), saying what went wrong and where.
async fn pull_saying_why(kura: &Kura, image: &PushedImage) -> Result<(), String> {
    let client = http_client(Duration::from_secs(60));
    let manifest = format!("{}/v2/{}/manifests/latest", kura.url(), image.repository);
    let response = client
        .get(&manifest)
        .send()
        .await
        .map_err(|e| format!("GET {manifest}: {e}"))?;
    if response.status() != 200 {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("GET {manifest}: {status} {body}"));
    }
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            kura.url(),
            image.repository,
            blob.digest
        );
        get_blob_saying_why(&client, &url, &blob.digest, blob.size).await?;
    }
    Ok(())
}

async fn get_blob_saying_why(
    client: &reqwest::Client,
    url: &str,
    digest: &str,
    size: u64,
) -> Result<(), String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Err(format!("GET {url}: {status} {body}"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: body failed: {e}"))?;
    if body.len() as u64 != size || sha256_digest(&body) != digest {
        return Err(format!(
            "GET {url}: {} bytes, {} (expected {size}, {digest})",
            body.len(),
            sha256_digest(&body)
        ));
    }
    Ok(())
}

fn blob_keys_hold(keys: &[String], digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    keys.iter().any(|key| key.ends_with(hex))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_collects_while_three_serve_an_image_in_use() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let used = push(&upstream, "gc/used", 300_000, 1).await;
    let unused = push(&upstream, "gc/unused", 300_000, 2).await;
    let used_elsewhere = push(&upstream, "gc/elsewhere", 300_000, 6).await;
    let env = [
        ("REGISTRY_PROXY_TTL", "3s"),
        ("REGISTRY_PROXY_TAGTTL", "1h"),
        ("REGISTRY_CACHE_GCINTERVAL", "1s"),
        ("REGISTRY_CACHE_GCGRACE", "0"),
    ];
    let (a, _a) = replica(&s3, &upstream, "", &env).await;
    let (b, _b) = replica(&s3, &upstream, "", &env).await;
    let (c, _c) = replica(&s3, &upstream, "", &env).await;
    let replicas = [&a, &b, &c];
    wait_for_each_other(&replicas).await;

    let collector = owner_of(&replicas, "gc");
    pull_saying_why(&a, &unused).await.unwrap();
    // Pull one image in a loop through every replica, and another only
    // through the replicas that do not collect (only their flushed access
    // records keep it), for several TTLs and collections; not one pull
    // may fail.
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut pulls = 0;
    while Instant::now() < deadline {
        for kura in replicas {
            let mut images = vec![&used];
            if kura.url() != collector.url() {
                images.push(&used_elsewhere);
            }
            for image in images {
                if let Err(why) = pull_saying_why(kura, image).await {
                    panic!("pull {pulls} failed: {why}\n{}", kura.log_text());
                }
                pulls += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pulls > 30, "only {pulls} pulls");

    // What expired is gone; what was in use is all there.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let keys = s3.keys("kura/blobs/sha256/").await;
        let expired_gone = !blob_keys_hold(&keys, &unused.layers[0].digest)
            && !blob_keys_hold(&keys, &unused.digest);
        if expired_gone {
            for digest in used
                .all_digests()
                .into_iter()
                .chain(used_elsewhere.all_digests())
            {
                assert!(
                    blob_keys_hold(&keys, &digest),
                    "{digest} in use was deleted"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired image is still stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let collectors: Vec<String> = replicas
        .iter()
        .filter(|kura| kura.log_text().contains("evicted unused content"))
        .map(|kura| kura.url())
        .collect();
    assert_eq!(collectors.len(), 1, "replicas that deleted: {collectors:?}");
    assert_eq!(collectors[0], collector.url());
    // Nothing in use was ever deleted: it would have been fetched again.
    for image in [&used, &used_elsewhere] {
        let layer = &image.layers[0].digest;
        assert_eq!(
            upstream.count_requests("GET", &format!("/blobs/{layer}")),
            1,
            "{} was fetched again after a deletion",
            image.repository
        );
    }
}

/// 16 clients on each of `replicas` GET the same cold blob at once.
async fn sixteen_clients_each(replicas: &[&Kura], image: &PushedImage) -> Vec<Result<(), String>> {
    let layer = &image.layers[0];
    let client = http_client(Duration::from_secs(120));
    let gets = replicas.iter().flat_map(|kura| {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            kura.url(),
            image.repository,
            layer.digest
        );
        let client = client.clone();
        (0..16).map(move |_| {
            let (client, url) = (client.clone(), url.clone());
            let (digest, size) = (layer.digest.clone(), layer.size);
            tokio::spawn(async move { get_blob_saying_why(&client, &url, &digest, size).await })
        })
    });
    let gets: Vec<_> = gets.collect();
    let mut results = Vec::new();
    for get in gets {
        results.push(get.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_blob_pulled_through_two_replicas_at_once_is_fetched_once() {
    cold_blob_through_replicas_is_fetched_once(2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_blob_pulled_through_three_replicas_at_once_is_fetched_once() {
    cold_blob_through_replicas_is_fetched_once(3).await;
}

/// `count` replicas, 16 clients on each GETting one cold 32 MiB blob at
/// once: one upstream GET, every client the right bytes, and every
/// replica but the owner got it from the owner.
async fn cold_blob_through_replicas_is_fetched_once(count: usize) {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let image = push(&upstream, "flight/cold", 32 << 20, 3).await;
    let mut started = Vec::new();
    for _ in 0..count {
        started.push(replica(&s3, &upstream, "", &[]).await);
    }
    let replicas: Vec<&Kura> = started.iter().map(|(kura, _)| kura).collect();
    wait_for_each_other(&replicas).await;

    let before = upstream.bytes_served();
    let results = sixteen_clients_each(&replicas, &image).await;
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} GETs failed: {failures:?}",
        failures.len(),
        results.len()
    );
    let layer = &image.layers[0];
    assert_eq!(
        upstream.count_requests("GET", &format!("/blobs/{}", layer.digest)),
        1,
        "the upstream served the blob more than once"
    );
    let fetched = upstream.bytes_served() - before;
    assert!(
        fetched >= layer.size && fetched < layer.size + (1 << 20),
        "{fetched} bytes from the upstream for one {} byte blob",
        layer.size
    );
    let owner = owner_of(&replicas, &layer.digest);
    for kura in replicas.iter().filter(|kura| kura.url() != owner.url()) {
        let metrics = kura.metrics_text().await;
        assert!(
            metrics.contains("kura_peer_requests_total{outcome=\"served\"} 1"),
            "{} did not get the blob from its owner:\n{metrics}",
            kura.url()
        );
    }
    // And the bucket got it from the owner alone: the others waited for
    // its upload instead of sending their own.
    let deadline = Instant::now() + Duration::from_secs(30);
    let others: Vec<&&Kura> = replicas
        .iter()
        .filter(|kura| kura.url() != owner.url())
        .collect();
    while !others
        .iter()
        .all(|kura| kura.log_text().contains("blob stored by its owner replica"))
    {
        assert!(
            Instant::now() < deadline,
            "a replica uploaded the owner's blob itself"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !owner
            .log_text()
            .contains("blob stored by its owner replica")
    );
}

/// The peer endpoint of a replica for an image's first layer.
fn peer_blob_url(kura: &Kura, image: &PushedImage) -> String {
    format!(
        "{}/kura/peer/blobs/proxy/{}/{}",
        kura.url(),
        image.repository,
        image.layers[0].digest
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_requests_without_the_cluster_secret_are_refused() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let image = push(&upstream, "flight/secret", 1000, 4).await;
    let (a, _a) = replica(&s3, &upstream, "", &[]).await;
    let url = peer_blob_url(&a, &image);
    let client = http_client(Duration::from_secs(30));
    for authorization in [None, Some("Bearer wrong-secret"), Some(SECRET)] {
        let mut request = client.get(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "with {authorization:?}");
    }
    assert_eq!(
        upstream.count_requests("GET", "/blobs/"),
        0,
        "a refused peer request reached the upstream"
    );
    let response = client.get(&url).bearer_auth(SECRET).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), image.layers[0].digest);
    assert!(!a.log_text().contains(SECRET), "the secret was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_owner_mid_download_fails_no_client_of_the_others() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let image = push(&upstream, "flight/killed", 128 << 20, 5).await;
    // Patient with the owner, so the others are surely following it.
    let patient = "  peertimeout: 30s\n";
    let (a, _a) = replica(&s3, &upstream, patient, &[]).await;
    let (b, _b) = replica(&s3, &upstream, patient, &[]).await;
    let (c, _c) = replica(&s3, &upstream, patient, &[]).await;
    let mut all = [a, b, c];
    let layer = image.layers[0].clone();
    let owner_url = {
        let replicas: Vec<&Kura> = all.iter().collect();
        wait_for_each_other(&replicas).await;
        owner_of(&replicas, &layer.digest).url()
    };
    let owner_index = all.iter().position(|k| k.url() == owner_url).unwrap();

    // The owner's download is part-way when the upstream freezes.
    let before = upstream.bytes_served();
    let others: Vec<&Kura> = all.iter().filter(|k| k.url() != owner_url).collect();
    let urls: Vec<String> = others.iter().map(|k| k.url()).collect();
    let pulls = {
        let image = image.clone();
        tokio::spawn(async move {
            let kuras: Vec<String> = urls;
            let client = http_client(Duration::from_secs(120));
            let layer = &image.layers[0];
            let mut gets = Vec::new();
            for url in &kuras {
                for _ in 0..16 {
                    let url = format!("{url}/v2/{}/blobs/{}", image.repository, layer.digest);
                    let client = client.clone();
                    let (digest, size) = (layer.digest.clone(), layer.size);
                    gets.push(tokio::spawn(async move {
                        get_blob_saying_why(&client, &url, &digest, size).await
                    }));
                }
            }
            let mut results = Vec::new();
            for get in gets {
                results.push(get.await.unwrap());
            }
            results
        })
    };
    drop(others);
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream.bytes_served() < before + (8 << 20) {
        assert!(
            Instant::now() < deadline,
            "the owner's download never started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    upstream.pause();
    let owner_fetched = upstream.bytes_served() - before;
    assert!(
        owner_fetched < layer.size,
        "the download finished before the upstream froze"
    );
    all[owner_index].kill9();
    upstream.resume();

    let results = pulls.await.unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let logs: String = all.iter().map(|k| k.log_text()).collect();
    assert!(
        failures.is_empty(),
        "{} of 32 GETs failed with the owner gone: {failures:?}\n{logs}",
        failures.len()
    );
    assert!(
        logs.contains("the upstream takes over"),
        "no replica was following the owner's body when it died:\n{logs}"
    );
    // Each taking over asked only for what the owner had not sent it.
    let taken_over = upstream.bytes_served() - before - owner_fetched;
    assert!(
        taken_over < 2 * layer.size,
        "the upstream sent {taken_over} bytes after the owner died, the whole blob twice\n{logs}"
    );
    let partial_gets = upstream
        .requests()
        .iter()
        .filter(|r| r.uri.contains(&layer.digest) && r.status == 206)
        .count();
    assert!(
        partial_gets >= 1,
        "no replica took over with a Range request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_requests_past_the_bound_get_503_and_a_stopped_replica_leaves_at_once() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let image = push(&upstream, "flight/bounded", 32 << 20, 7).await;
    let (a, _a) = replica(&s3, &upstream, "  maxpeerrequests: 1\n", &[]).await;
    let url = peer_blob_url(&a, &image);
    let client = http_client(Duration::from_secs(30));
    let peer_get = || client.get(&url).bearer_auth(SECRET).send();

    // The first holds the one slot while its body is unread.
    let first = peer_get().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = peer_get().await.unwrap();
    assert_eq!(second.status(), 503, "a second peer request was served");
    assert!(second.headers().contains_key("retry-after"));
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = peer_get().await.unwrap();
        if again.status() == 200 {
            let body = again.bytes().await.unwrap();
            assert_eq!(sha256_digest(&body), image.layers[0].digest);
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A replica that stops removes its heartbeat (an expired one would
    // stay for four expiries).
    let (mut b, _b) = replica(&s3, &upstream, "", &[]).await;
    wait_for_each_other(&[&a, &b]).await;
    assert_eq!(s3.keys("kura/_kura/replicas/").await.len(), 2);
    assert!(b.terminate(Duration::from_secs(30)).await, "b did not stop");
    assert_eq!(
        s3.keys("kura/_kura/replicas/").await,
        vec![format!("kura/_kura/replicas/{}", replica_id(&a))],
        "b's heartbeat outlived it:\n{}",
        b.log_text()
    );
}

/// The owner's download turns are all taken (by a download its paused
/// upstream never answers): a peer asking for another cold blob is refused
/// at once, also when the owner's own client already queued a download of
/// it, so the asker fetches the blob itself instead of waiting out
/// `downloadwait` and then fetching it anyway; a peer asking for the blob
/// being downloaded joins that download.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_owner_refuses_a_peer_at_once_and_a_running_download_is_shared() {
    let s3 = S3Server::start().await;
    let upstream = Upstream::anonymous().await;
    let running = push(&upstream, "flight/running", 1 << 20, 10).await;
    let other = push(&upstream, "flight/other", 1 << 20, 12).await;
    let env = [
        ("REGISTRY_CACHE_MAXDOWNLOADS", "1"),
        ("REGISTRY_CACHE_DOWNLOADWAIT", "300s"),
        ("REGISTRY_PROXY_RESPONSETIMEOUT", "60s"),
    ];
    let (a, _a) = replica(&s3, &upstream, "", &env).await;
    upstream.pause();
    let client = http_client(Duration::from_secs(20));
    let peer_get = |image: &PushedImage| {
        client
            .get(peer_blob_url(&a, image))
            .bearer_auth(SECRET)
            .send()
    };
    let first = tokio::spawn(peer_get(&running));
    wait_for_metric(&a, "kura_downloads_in_flight 1").await;

    let other_url = format!(
        "{}/v2/{}/blobs/{}",
        a.url(),
        other.repository,
        other.layers[0].digest
    );
    let queued = tokio::spawn(client.get(other_url).send());
    wait_for_metric(&a, "kura_downloads_waiting 1").await;
    let refused = peer_get(&other).await;
    let refused = refused.expect("the peer request waited for a turn");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let joined = tokio::spawn(peer_get(&running));
    wait_for_metric(&a, "kura_coalesced_waiters_total 1").await;
    upstream.resume();
    for response in [first.await.unwrap(), joined.await.unwrap()] {
        let body = response.unwrap().bytes().await.unwrap();
        assert_eq!(sha256_digest(&body), running.layers[0].digest);
    }
    let body = queued.await.unwrap().unwrap().bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), other.layers[0].digest);
    assert_eq!(
        upstream.count_requests("GET", &running.layers[0].digest),
        1,
        "the blob being downloaded was fetched again"
    );
    // Peers' bytes and the client's are counted apart.
    let metrics = a.metrics_text().await;
    let served = |source: &str, bytes: u64| {
        format!("kura_blob_bytes_served_total{{upstream=\"proxy\",source=\"{source}\"}} {bytes}")
    };
    for line in [
        served("peer", 2 * running.layers[0].size),
        served("download", other.layers[0].size),
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line}\n{metrics}");
    }
}
