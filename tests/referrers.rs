//! OCI 1.1 referrers through Kura. Against real Distribution 2.8 upstreams (anonymous and token),
//! which have no referrers API: a signature and an SBOM attached to an image with the referrers
//! tag schema are listed, filtered, pulled by digest, and still served with the upstream stopped;
//! routed by `?ns=` and path prefix as manifests are; `kura warm` brings them along. Against a
//! stub with the API: pages are merged into one answer, bounded, and kept on the upstream's
//! origin.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kura::upstream::referrers::MAX_REFERRERS_PAGES;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::artifacts::{PushedArtifact, push_artifact, push_referrers_tag, referrers_tag};
use support::images::{Flavor, ImageBuild, OCI_INDEX, sha256_digest};
use support::process::run_tool;
use support::referrers_api::{SBOM_TYPE, SIGNATURE_TYPE};
use support::{Kura, KuraOptions, Platform, PushedImage, ReferrersApi, Upstream};

const REPO: &str = "signed/app";
/// A named upstream (same registry as the default one) for the routing checks.
const NAMED: &str = "registry-a.test";
const TIMEOUT: Duration = Duration::from_secs(30);

/// An image with a signature and an SBOM attached through the referrers tag schema.
struct Attached {
    image: PushedImage,
    signature: PushedArtifact,
    sbom: PushedArtifact,
}

impl Attached {
    fn artifacts(&self) -> [&PushedArtifact; 2] {
        [&self.signature, &self.sbom]
    }
}

async fn attach(upstream: &Upstream) -> Attached {
    let client = upstream.client();
    let image = ImageBuild::synthetic(Flavor::Oci, Platform::linux("amd64", None), REPO, 1)
        .push(&client, REPO, Some("v1"))
        .await;
    let signature = push_artifact(
        &client,
        &image,
        SIGNATURE_TYPE,
        b"signature over the image digest",
        json!({"org.example.kind": "signature"}),
    )
    .await;
    let sbom = push_artifact(
        &client,
        &image,
        SBOM_TYPE,
        br#"{"spdxVersion":"SPDX-2.3","name":"signed/app"}"#,
        json!({"org.example.kind": "sbom"}),
    )
    .await;
    push_referrers_tag(&client, &image, &[&signature, &sbom]).await;
    Attached {
        image,
        signature,
        sbom,
    }
}

fn http() -> reqwest::Client {
    support::net::http_client(TIMEOUT)
}

/// A referrers answer: status, the headers that matter, and the index.
struct Listed {
    status: StatusCode,
    filters_applied: Option<String>,
    warning: Option<String>,
    link: Option<String>,
    index: Value,
}

impl Listed {
    fn digests(&self) -> BTreeSet<String> {
        self.index["manifests"]
            .as_array()
            .unwrap_or_else(|| panic!("no manifests in {}", self.index))
            .iter()
            .map(|d| d["digest"].as_str().expect("digest").to_owned())
            .collect()
    }
}

async fn list(url: &str) -> Listed {
    let response = http().get(url).send().await.expect("referrers GET");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, filters_applied, warning, link) = (
        response.status(),
        header("oci-filters-applied"),
        header("warning"),
        header("link"),
    );
    if status == StatusCode::OK {
        assert_eq!(header("content-type").as_deref(), Some(OCI_INDEX));
    }
    let index = response.json().await.expect("JSON body");
    Listed {
        status,
        filters_applied,
        warning,
        link,
        index,
    }
}

/// Checks the full list and the filtered one of `attached` at `url` (`?` or `&` joins a filter).
async fn check_lists(url: &str, attached: &Attached, stale: bool) {
    let all = list(url).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.index);
    let expected: BTreeSet<String> = attached.artifacts().map(|a| a.digest.clone()).into();
    assert_eq!(all.digests(), expected);
    for artifact in attached.artifacts() {
        let listed = all.index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["digest"] == artifact.digest.as_str())
            .unwrap();
        assert_eq!(
            listed,
            &artifact.descriptor(),
            "descriptor served as pushed"
        );
    }
    assert_eq!(all.filters_applied, None);
    assert_eq!(all.warning.is_some(), stale, "{:?}", all.warning);

    let join = if url.contains('?') { '&' } else { '?' };
    let filtered = list(&format!("{url}{join}artifactType={SIGNATURE_TYPE}")).await;
    assert_eq!(filtered.status, StatusCode::OK);
    assert_eq!(
        filtered.digests(),
        BTreeSet::from([attached.signature.digest.clone()])
    );
    assert_eq!(filtered.filters_applied.as_deref(), Some("artifactType"));
}

/// Pulls each artifact's manifest and blobs by digest from `base` (`http://kura/v2/<repo>`).
async fn pull_artifacts(base: &str, attached: &Attached) {
    for artifact in attached.artifacts() {
        let response = http()
            .get(format!("{base}/manifests/{}", artifact.digest))
            .header("accept", support::images::OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.bytes().await.unwrap();
        assert_eq!(sha256_digest(&body), artifact.digest);
        for digest in artifact.blob_digests() {
            let response = http()
                .get(format!("{base}/blobs/{digest}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{digest}");
            assert_eq!(sha256_digest(&response.bytes().await.unwrap()), digest);
        }
    }
}

/// Kura in front of `upstream` as the default upstream and as the named `NAMED`, listing
/// referrers afresh on every request (`referrersttl: 0`), so stale answers can be seen.
async fn kura_for(upstream: &Upstream, dir: &Path) -> Kura {
    let credentials = upstream
        .credentials()
        .map(|(user, pass)| format!("    username: {user}\n    password: {pass}\n"))
        .unwrap_or_default();
    let config = dir.join("kura.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nproxy:\n  remoteurl: {url}\n  referrersttl: 0\n\
             upstreams:\n  - name: {NAMED}\n    remoteurl: {url}\n{credentials}",
            url = upstream.url()
        ),
    )
    .unwrap();
    // The default upstream's credentials come from the environment.
    let mut options = KuraOptions::for_upstream(upstream);
    options.extra_args.push(config.display().to_string());
    Kura::start(options).await
}

async fn signatures_and_sboms_through_kura(mut upstream: Upstream) {
    let attached = attach(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let kura = kura_for(&upstream, dir.path()).await;
    let subject = &attached.image.digest;
    let base = format!("{}/v2/{REPO}", kura.url());
    let by_prefix = format!("{}/v2/{NAMED}/{REPO}", kura.url());
    let lists = [
        format!("{base}/referrers/{subject}"),
        format!("{by_prefix}/referrers/{subject}"),
        format!("{base}/referrers/{subject}?ns={NAMED}"),
    ];
    for url in &lists {
        check_lists(url, &attached, false).await;
    }
    pull_artifacts(&base, &attached).await;
    pull_artifacts(&by_prefix, &attached).await;

    let unknown = sha256_digest(b"no such subject");
    let empty = list(&format!("{base}/referrers/{unknown}")).await;
    assert_eq!(empty.status, StatusCode::OK, "never 404 for a subject");
    assert_eq!(empty.index["manifests"], json!([]));
    assert_eq!(empty.index["schemaVersion"], 2);
    let unknown_hex = &unknown["sha256:".len()..];
    let stored_for_unknown = walk_files(kura.cache_dir())
        .iter()
        .any(|path| path.ends_with(unknown_hex));
    assert!(
        !stored_for_unknown,
        "an unknown subject's empty list was stored"
    );
    let invalid = list(&format!("{base}/referrers/sha256:totallywrong")).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert_eq!(invalid.index["errors"][0]["code"], "DIGEST_INVALID");

    upstream.stop();
    for url in &lists {
        check_lists(url, &attached, true).await;
    }
    pull_artifacts(&base, &attached).await;
    // An empty list of a subject nobody pulled is not stored (any client
    // can name endless made-up subjects): with the upstream gone, Kura
    // cannot know, and says so.
    let unknown_now = list(&format!("{base}/referrers/{unknown}")).await;
    assert_eq!(unknown_now.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unknown_now.index["errors"][0]["code"], "UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_and_sboms_from_an_anonymous_registry_without_the_api() {
    signatures_and_sboms_through_kura(Upstream::anonymous().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_and_sboms_from_a_token_registry_without_the_api() {
    signatures_and_sboms_through_kura(Upstream::token("puller", "referrers-secret").await).await;
}

fn warm(cache: &Path, upstream: &Upstream, extra: &[&str], image: &str) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kura"));
    command
        .arg("warm")
        .args(extra)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--upstream")
        .arg(upstream.url())
        .arg(image);
    let output = run_tool(command, Duration::from_secs(120));
    assert!(
        output.success(),
        "warm failed:\n{}\n{}",
        output.stdout,
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_brings_signatures_and_sboms_along() {
    let mut upstream = Upstream::anonymous().await;
    let attached = attach(&upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let image = attached.image.reference();
    let referrers_path = format!("/v2/{REPO}/referrers/");

    warm(
        &dir.path().join("plain"),
        &upstream,
        &["--no-referrers"],
        &image,
    );
    assert_eq!(upstream.count_requests("GET", &referrers_path), 0);
    assert_eq!(upstream.count_requests("GET", "/manifests/sha256-"), 0);

    let cache = dir.path().join("cache");
    warm(&cache, &upstream, &[], &image);
    let subject = &attached.image.digest;
    let count = |method: &str, path: &str| upstream.count_requests(method, path);
    // The image's list: the API (404 here), then the referrers tag.
    assert_eq!(count("GET", &format!("{referrers_path}{subject}")), 1);
    assert_eq!(
        count("GET", &format!("/manifests/{}", referrers_tag(subject))),
        1
    );
    for artifact in attached.artifacts() {
        assert_eq!(count("GET", &format!("/manifests/{}", artifact.digest)), 1);
        // The next level: each artifact's own referrers, asked once.
        assert_eq!(
            count("GET", &format!("{referrers_path}{}", artifact.digest)),
            1
        );
        assert_eq!(
            count("GET", &format!("/blobs/{}", artifact.payload.digest)),
            1
        );
    }
    // The empty config both artifacts share is fetched once.
    assert_eq!(
        count("GET", &format!("/blobs/{}", attached.sbom.config.digest)),
        1
    );

    upstream.stop();
    let mut options = KuraOptions::new(&upstream.url());
    options.cache_dir = Some(cache);
    let kura = Kura::start(options).await;
    let base = format!("{}/v2/{REPO}", kura.url());
    check_lists(&format!("{base}/referrers/{subject}"), &attached, false).await;
    pull_artifacts(&base, &attached).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_of_a_referrers_api_are_merged_bounded_and_kept_on_its_origin() {
    let stub = ReferrersApi::start();
    let kura = Kura::start(KuraOptions::new(&stub.url())).await;
    let base = format!("{}/v2/org/app/referrers", kura.url());
    let stub_path = |subject: &str| format!("/v2/org/app/referrers/{subject}");

    let subject = ReferrersApi::paged_subject();
    let all = list(&format!("{base}/{subject}")).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.index);
    assert_eq!(
        all.index["manifests"],
        json!(ReferrersApi::paged_referrers()),
        "every page, in order, descriptors as served"
    );
    assert_eq!(all.link, None, "merged: nothing left to page");
    for page in ["".to_owned(), "?page=1".to_owned(), "?page=2".to_owned()] {
        assert_eq!(
            stub.hits("GET", &format!("{}{page}", stub_path(&subject))),
            1
        );
    }

    let head = http()
        .head(format!("{base}/{subject}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let length = serde_json::to_vec(&all.index).unwrap().len().to_string();
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        length,
        "HEAD announces the GET's length"
    );

    let signatures = list(&format!("{base}/{subject}?artifactType={SIGNATURE_TYPE}")).await;
    assert_eq!(signatures.filters_applied.as_deref(), Some("artifactType"));
    let expected: Vec<Value> = ReferrersApi::paged_referrers()
        .into_iter()
        .filter(|d| d["artifactType"] == SIGNATURE_TYPE)
        .collect();
    assert_eq!(signatures.index["manifests"], json!(expected));
    assert_eq!(
        stub.hits_containing(&subject),
        3,
        "within referrersttl, every filter is answered from the cached list"
    );

    let none = list(&format!("{base}/{}", sha256_digest(b"unreferenced"))).await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.index["manifests"], json!([]));

    let endless = ReferrersApi::endless_subject();
    let refused = list(&format!("{base}/{endless}")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.index["errors"][0]["code"], "UNAVAILABLE");
    assert_eq!(stub.hits_containing(&endless), MAX_REFERRERS_PAGES);

    let elsewhere = ReferrersApi::elsewhere_subject();
    let refused = list(&format!("{base}/{elsewhere}")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        stub.hits_containing(&elsewhere),
        1,
        "the other origin is never dialled"
    );
}

/// Every file under `dir`, recursively.
fn walk_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path.display().to_string());
            }
        }
    }
    found
}
