//! Access rules end to end: one Kura with htpasswd users, a groups file and
//! a rules file in front of two real registries, a Hub-like one (named
//! `docker.io`, anonymous upstream) and a private one Kura holds
//! credentials for. Real clients log in to Kura (skopeo `--src-creds`,
//! podman `login`, ctr `--user`); what the rules refuse never reaches an
//! upstream, and `_catalog` shows each client only what it may pull.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::clients::{
    Containerd, ctr_pull_via_as, podman_login_pull_via, skopeo_copy, skopeo_copy_as,
};
use support::images::{Flavor, ImageBuild};
use support::{Kura, KuraOptions, Platform, PushedImage, Upstream};

const HUB: &str = "docker.io";
const PRIVATE: &str = "private.test";
const ALICE: (&str, &str) = ("alice", "alice-pw-2718");
const BOB: (&str, &str) = ("bob", "bob-pw-1618");
const UPSTREAM_PASSWORD: &str = "upstream-pw-5772";

/// Anonymous clients may pull one official image, alice every official
/// image, the `ops` group the private registry.
const RULES: &str = r#"rules:
  - anonymous: true
    pull: ["docker.io/library/alpine"]
  - users: [alice]
    pull: ["docker.io/library/*"]
  - groups: [ops]
    pull: ["private.test/**"]
"#;
const GROUPS: &str = "ops: bob\n";
/// Reload demo: alice loses busybox.
const RULES_WITHOUT_BUSYBOX: &str = r#"rules:
  - anonymous: true
    pull: ["docker.io/library/alpine"]
  - users: [alice]
    pull: ["docker.io/library/*"]
    deny: ["docker.io/library/busybox"]
  - groups: [ops]
    pull: ["private.test/**"]
"#;

struct Setup {
    hub: Upstream,
    private: Upstream,
    alpine: PushedImage,
    busybox: PushedImage,
    secret: PushedImage,
    kura: Kura,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Self {
        let hub = Upstream::anonymous().await;
        let private = Upstream::htpasswd("puller", UPSTREAM_PASSWORD).await;
        let amd64 = || Platform::linux("amd64", None);
        let push = |label: &str| ImageBuild::synthetic(Flavor::Oci, amd64(), label, 2);
        let alpine = push("alpine")
            .push(&hub.client(), "library/alpine", Some("latest"))
            .await;
        let busybox = push("busybox")
            .push(&hub.client(), "library/busybox", Some("latest"))
            .await;
        let secret = push("secret")
            .push(&private.client(), "team/secret", Some("latest"))
            .await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &hub, &private);
        let mut options = KuraOptions::new("http://127.0.0.1:1");
        options.extra_args.push(config.display().to_string());
        let kura = Kura::start(options).await;
        Self {
            hub,
            private,
            alpine,
            busybox,
            secret,
            kura,
            dir,
        }
    }

    fn rules_path(&self) -> PathBuf {
        self.dir.path().join("rules.yml")
    }

    fn groups_path(&self) -> PathBuf {
        self.dir.path().join("groups")
    }

    async fn get(&self, path: &str, credentials: Option<(&str, &str)>) -> Answer {
        let client = support::net::http_client(Duration::from_secs(60));
        let mut request = client.get(format!("{}{path}", self.kura.url()));
        if let Some((user, password)) = credentials {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.bytes().await.unwrap();
        Answer {
            status,
            challenge,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        }
    }

    async fn catalog(&self, credentials: Option<(&str, &str)>) -> Vec<String> {
        let answer = self.get("/v2/_catalog", credentials).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        serde_json::from_value(answer.body["repositories"].clone()).unwrap()
    }

    /// Every path a client pulls `image` of `registry` by: the manifest by
    /// tag and by digest, config and layers.
    fn content_paths(registry: &str, image: &PushedImage) -> Vec<String> {
        let base = format!("/v2/{registry}/{}", image.repository);
        let mut paths = vec![
            format!("{base}/manifests/latest"),
            format!("{base}/manifests/{}", image.digest),
        ];
        paths.extend(
            image
                .blob_digests()
                .iter()
                .map(|digest| format!("{base}/blobs/{digest}")),
        );
        paths
    }
}

struct Answer {
    status: StatusCode,
    challenge: Option<String>,
    body: serde_json::Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["errors"][0]["code"].as_str().unwrap_or("")
    }

    fn message(&self) -> &str {
        self.body["errors"][0]["message"].as_str().unwrap_or("")
    }
}

fn write_config(dir: &Path, hub: &Upstream, private: &Upstream) -> PathBuf {
    let hash = |password: &str| bcrypt::hash(password, 4).unwrap();
    let htpasswd = format!("{}:{}\n{}:{}\n", ALICE.0, hash(ALICE.1), BOB.0, hash(BOB.1));
    std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
    std::fs::write(dir.join("rules.yml"), RULES).unwrap();
    std::fs::write(dir.join("groups"), GROUPS).unwrap();
    std::fs::write(dir.join("private-password"), UPSTREAM_PASSWORD).unwrap();
    let (upstream_user, _) = private.credentials().unwrap();
    let config = format!(
        "version: 0.1
upstreams:
  - name: {HUB}
    remoteurl: {hub}
  - name: {PRIVATE}
    remoteurl: {private}
    username: {upstream_user}
    passwordfile: {dir}/private-password
auth:
  htpasswd:
    realm: kura-test
    path: {dir}/htpasswd
  rules:
    path: {dir}/rules.yml
  groups:
    path: {dir}/groups
",
        hub = hub.url(),
        private = private.url(),
        dir = dir.display(),
    );
    let path = dir.join("kura.yml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Requests the upstream saw for `repository` so far.
fn upstream_requests_for(upstream: &Upstream, repository: &str) -> usize {
    let needle = format!("/v2/{repository}/");
    upstream
        .requests()
        .iter()
        .filter(|r| r.uri.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_pull_what_rules_grant_and_nothing_else() {
    let setup = Setup::start().await;
    let kura = &setup.kura;
    // The pushes that seeded them are in the upstreams' logs already.
    let private_before = upstream_requests_for(&setup.private, "team/secret");
    let hub_before = upstream_requests_for(&setup.hub, "library/busybox");

    // alice may pull official images only: the private registry's image is
    // refused whole (manifest by tag and digest, config and layers), by
    // path prefix and by ?ns= alike, naming nothing.
    let mut refused = Setup::content_paths(PRIVATE, &setup.secret);
    refused.push(format!("/v2/team/secret/manifests/latest?ns={PRIVATE}"));
    refused.push(format!("/v2/{PRIVATE}/team/secret/tags/list"));
    for path in &refused {
        let answer = setup.get(path, Some(ALICE)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(answer.code(), "DENIED", "{path}");
        assert!(!answer.message().contains("secret") && !answer.message().contains("private"));
        // Anonymous clients are asked to log in instead.
        let answer = setup.get(path, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            answer.challenge.as_deref(),
            Some("Basic realm=\"kura-test\"")
        );
    }
    for path in Setup::content_paths(HUB, &setup.busybox) {
        let answer = setup.get(&path, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "anonymous {path}");
    }
    assert_eq!(
        upstream_requests_for(&setup.private, "team/secret"),
        private_before,
        "a refused request reached the upstream"
    );
    assert_eq!(
        upstream_requests_for(&setup.hub, "library/busybox"),
        hub_before
    );
    let metrics = kura.metrics_text().await;
    assert!(!metrics.contains("secret") && !metrics.contains("busybox"));

    // Anonymous clients pull the public image (ctr without --user; skopeo
    // without credentials answers the challenge with empty ones).
    let containerd = Containerd::start();
    let mirror = kura.addr().to_string();
    let pulled = ctr_pull_via_as(&containerd, HUB, &mirror, "library/alpine:latest", None);
    assert_eq!(pulled.target_digest, setup.alpine.digest);
    let anonymous_copy = setup.dir.path().join("anonymous-alpine");
    let landed = skopeo_copy(
        format!("{mirror}/{HUB}"),
        "library/alpine:latest",
        &anonymous_copy,
        false,
    );
    assert_eq!(landed.top_digest, setup.alpine.digest);

    // alice pulls busybox with each client, logged in.
    let skopeo_dest = setup.dir.path().join("alice-busybox");
    let landed = skopeo_copy_as(
        format!("{mirror}/{HUB}"),
        "library/busybox:latest",
        &skopeo_dest,
        false,
        Some(ALICE),
    );
    assert!(landed.digests.is_superset(&setup.busybox.all_digests()));
    let location = format!("{mirror}/{HUB}");
    let pulled = podman_login_pull_via(HUB, &location, "library/busybox:latest", ALICE);
    assert_eq!(pulled.digest, setup.busybox.digest);
    let pulled = ctr_pull_via_as(
        &containerd,
        HUB,
        &mirror,
        "library/busybox:latest",
        Some(ALICE),
    );
    assert_eq!(pulled.target_digest, setup.busybox.digest);

    // bob (group ops) pulls the private image; alice still cannot.
    for path in Setup::content_paths(PRIVATE, &setup.secret) {
        assert_eq!(
            setup.get(&path, Some(BOB)).await.status,
            StatusCode::OK,
            "{path}"
        );
        let answer = setup.get(&path, Some(ALICE)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "cached {path}");
    }

    // Each client sees only what it may pull, paged without short pages.
    let alpine = format!("{HUB}/library/alpine");
    let busybox = format!("{HUB}/library/busybox");
    let secret = format!("{PRIVATE}/team/secret");
    assert_eq!(setup.catalog(None).await, vec![alpine.clone()]);
    assert_eq!(
        setup.catalog(Some(ALICE)).await,
        [alpine.clone(), busybox.clone()]
    );
    assert_eq!(
        setup.catalog(Some(BOB)).await,
        [alpine.clone(), secret.clone()]
    );
    let first = setup.get("/v2/_catalog?n=1", Some(BOB)).await;
    assert_eq!(first.body["repositories"], serde_json::json!([alpine]));
    let next = setup
        .get(&format!("/v2/_catalog?n=1&last={alpine}"), Some(BOB))
        .await;
    assert_eq!(next.body["repositories"], serde_json::json!([secret]));

    // The dashboard's view of a named upstream's repository reads the
    // repository it authorized: bob sees the tag and its digest, alice
    // does not learn it exists.
    let detail = format!("/kura/api/v1/repositories/{secret}");
    let answer = setup.get(&detail, Some(BOB)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["tags"][0]["tag"], "latest");
    assert_eq!(
        answer.body["tags"][0]["digest"],
        setup.secret.digest.as_str()
    );
    let answer = setup.get(&detail, Some(ALICE)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    // A blob is served only under a repository that holds it: busybox's
    // layer, stored since alice pulled it, is unknown in alpine.
    let foreign = &setup.busybox.layers[0].digest;
    assert!(!setup.alpine.blob_digests().contains(foreign));
    for credentials in [None, Some(ALICE)] {
        let path = format!("/v2/{HUB}/library/alpine/blobs/{foreign}");
        let answer = setup.get(&path, credentials).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{credentials:?}");
        assert_eq!(answer.code(), "BLOB_UNKNOWN");
        let own = format!(
            "/v2/{HUB}/library/alpine/blobs/{}",
            setup.alpine.layers[0].digest
        );
        assert_eq!(setup.get(&own, credentials).await.status, StatusCode::OK);
    }
    assert!(!kura.log_text().contains(ALICE.1) && !kura.log_text().contains(UPSTREAM_PASSWORD));
}

/// Polls (10 s at most) until `path` answers `expected` for `credentials`.
async fn wait_for_status(
    setup: &Setup,
    path: &str,
    credentials: (&str, &str),
    expected: StatusCode,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = setup.get(path, Some(credentials)).await.status;
        if status == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still {status}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rules_and_groups_files_reload_without_restart() {
    let setup = Setup::start().await;
    let secret = format!("/v2/{PRIVATE}/team/secret/manifests/latest");
    let busybox = format!("/v2/{HUB}/library/busybox/manifests/latest");
    assert_eq!(
        setup.get(&secret, Some(ALICE)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        setup.get(&busybox, Some(ALICE)).await.status,
        StatusCode::OK
    );

    std::fs::write(setup.groups_path(), "ops: bob, alice\n").unwrap();
    wait_for_status(&setup, &secret, ALICE, StatusCode::OK).await;

    std::fs::write(setup.rules_path(), RULES_WITHOUT_BUSYBOX).unwrap();
    wait_for_status(&setup, &busybox, ALICE, StatusCode::FORBIDDEN).await;

    // A broken file keeps the last good rules rather than opening anything.
    std::fs::write(setup.rules_path(), "rules:\n  - users: [alice]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        setup.get(&busybox, Some(ALICE)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(setup.get(&secret, Some(ALICE)).await.status, StatusCode::OK);
    assert!(setup.kura.log_text().contains("cannot reload"));
}
