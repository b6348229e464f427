//! Answers the distribution spec (and Distribution, where the spec leaves
//! room) prescribes, through Kura: tag lists paged by `n`/`last` whatever
//! the upstream does, upstream credential refusals that are never taken for
//! the client's own, and `Accept` negotiation of manifest lists.
//! (Impossible references are among the bad input of `tests/api.rs`.)

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use support::images::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Flavor, ImageBuild, OCI_INDEX, OCI_MANIFEST, push_index,
    sha256_digest,
};
use support::stalling::{PAGE_SIZE, PAGED_TAGS};
use support::{Kura, KuraOptions, Platform, StallingUpstream, Upstream};

/// More pages than any walk in these tests needs.
const MAX_PAGES_WALKED: usize = 20;

fn client() -> reqwest::Client {
    support::net::http_client(Duration::from_secs(60))
}

async fn get(kura: &Kura, path: &str) -> reqwest::Response {
    kura.get(path).await
}

async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["errors"][0]["code"].as_str().unwrap().to_owned()
}

/// One tag list page: its tags and the path its `Link` names, if any.
async fn tag_page(kura: &Kura, path: &str) -> (Vec<String>, Option<String>) {
    let response = get(kura, path).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let next = response.headers().get("link").map(|link| {
        let link = link.to_str().unwrap();
        let (target, rel) = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .unwrap_or_else(|| panic!("{path}: malformed Link {link}"));
        assert_eq!(rel, "; rel=\"next\"", "{path}: {link}");
        target.to_owned()
    });
    let body: serde_json::Value = response.json().await.unwrap();
    let tags = serde_json::from_value(body["tags"].clone()).unwrap();
    (tags, next)
}

/// Follows `Link` from `first` to the last page; every page, in order.
async fn walk_tag_pages(kura: &Kura, first: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut path = Some(first.to_owned());
    while let Some(current) = path {
        assert!(pages.len() < MAX_PAGES_WALKED, "{first}: Link never ends");
        let (tags, next) = tag_page(kura, &current).await;
        pages.push(tags);
        path = next;
    }
    pages
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut items = strings(items);
    items.sort();
    items
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_lists_are_paged_by_kura_although_distribution_ignores_n_and_last() {
    let mut upstream = Upstream::anonymous().await;
    let repo = "paging/app";
    let tags = ["v1", "v10", "v2", "latest", "alpha", "beta", "rc-1"];
    let image = ImageBuild::synthetic(Flavor::Docker, Platform::linux("amd64", None), repo, 1);
    let pushed = image.push(&upstream.client(), repo, Some(tags[0])).await;
    for tag in &tags[1..] {
        upstream
            .client()
            .push_manifest(repo, tag, &pushed.media_type, image.manifest.clone())
            .await;
    }
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let all = sorted(&tags);
    let list = format!("/v2/{repo}/tags/list");

    let (page, link) = tag_page(&kura, &format!("{list}?n=3")).await;
    assert_eq!(page, all[..3]);
    assert_eq!(link.unwrap(), format!("{list}?n=3&last={}", all[2]));
    let pages = walk_tag_pages(&kura, &format!("{list}?n=3")).await;
    assert!(pages.iter().all(|page| page.len() <= 3), "{pages:?}");
    assert_eq!(pages.concat(), all, "every tag exactly once, sorted");

    // containerd's `ns` stays on every next page.
    let (_, link) = tag_page(&kura, &format!("{list}?n=2&ns=docker.io")).await;
    assert_eq!(
        link.unwrap(),
        format!("{list}?n=2&last={}&ns=docker.io", all[1])
    );
    let (page, link) = tag_page(&kura, &format!("{list}?last=rc-1")).await;
    assert_eq!((page, link), (strings(&["v1", "v10", "v2"]), None));
    let (page, link) = tag_page(&kura, &format!("{list}?n=0")).await;
    assert_eq!((page, link), (vec![], None));
    let response = get(&kura, &format!("{list}?n=-1")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response).await, "PAGINATION_NUMBER_INVALID");

    // With the upstream gone, the tags Kura has cached page the same way.
    let cached = ["alpha", "latest", "v1", "v2"];
    for tag in cached {
        let response = get(&kura, &format!("/v2/{repo}/manifests/{tag}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{tag}");
    }
    upstream.stop();
    let pages = walk_tag_pages(&kura, &format!("{list}?n=2")).await;
    assert_eq!(pages, vec![strings(&cached[..2]), strings(&cached[2..])]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_pages_is_walked_whole_and_once_for_concurrent_requests() {
    let stub = StallingUpstream::start();
    let kura = Kura::start(KuraOptions::new(&stub.url())).await;
    let upstream_pages = PAGED_TAGS.len().div_ceil(PAGE_SIZE);

    let pages = walk_tag_pages(&kura, "/v2/paged/app/tags/list?n=2").await;
    assert_eq!(pages.concat(), sorted(&PAGED_TAGS));
    assert!(pages.iter().all(|page| page.len() <= 2), "{pages:?}");
    let (whole, link) = tag_page(&kura, "/v2/paged/app/tags/list").await;
    assert_eq!((whole, link), (sorted(&PAGED_TAGS), None));

    // 64 clients at once: they share walks instead of making one each.
    let clients = 64;
    let requests = (0..clients).map(|_| {
        let url = format!("{}/v2/paged/shared/tags/list?n=5", kura.url());
        tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
    });
    for status in futures_util::future::join_all(requests).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let walks = stub.hits("GET", "/v2/paged/shared/tags/list") / upstream_pages;
    assert!(
        walks <= clients / 8,
        "{clients} requests made {walks} walks"
    );

    // An upstream that links pages forever is followed only so far.
    let response = get(&kura, "/v2/endless/app/tags/list").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.text().await.unwrap();
    assert!(body.contains("longer than 100 pages"), "{body}");
    assert_eq!(stub.hits("GET", "/v2/endless/app/tags/list"), 100);
}

/// Kura with its own htpasswd (`alice`), proxying `upstream` with a wrong
/// password.
async fn kura_with_wrong_upstream_password(upstream: &Upstream, dir: &std::path::Path) -> Kura {
    let hash = bcrypt::hash("kura-pw", 6).unwrap();
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let config = dir.join("kura.yml");
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: kura-test\n    path: {}\n",
        htpasswd.display()
    );
    std::fs::write(&config, auth).unwrap();
    let mut options = KuraOptions::for_upstream(upstream);
    options.password = Some("not-the-upstream-password".into());
    options.extra_args.push(config.display().to_string());
    Kura::start(options).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_refusing_kuras_credentials_is_403_and_every_401_has_a_challenge() {
    let dir = tempfile::tempdir().unwrap();
    for upstream in [
        Upstream::token("puller", "token-upstream-pw").await,
        Upstream::htpasswd("puller", "basic-upstream-pw").await,
    ] {
        let seeded = support::seed_all(&upstream).await;
        let image = &seeded.multilayer;
        let kura = kura_with_wrong_upstream_password(&upstream, dir.path()).await;
        let paths = [
            format!("/v2/{}/manifests/latest", image.repository),
            format!("/v2/{}/blobs/{}", image.repository, image.config.digest),
            format!("/v2/{}/tags/list", image.repository),
        ];
        for path in &paths {
            let url = format!("{}{path}", kura.url());
            let response = client()
                .get(&url)
                .basic_auth("alice", Some("kura-pw"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
            assert!(response.headers().get("www-authenticate").is_none());
            let body = response.text().await.unwrap();
            assert!(
                body.contains("DENIED") && body.contains("refused Kura's credentials"),
                "{path}: {body}"
            );
            // Kura's own refusal is the only 401, and it says how to log in.
            let response = client().get(&url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(
                response.headers()["www-authenticate"],
                "Basic realm=\"kura-test\""
            );
        }
    }
}

/// What a manifest request answered.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    /// `Docker-Content-Digest` (for a 200; the error code otherwise).
    digest: String,
    content_type: String,
}

/// GET (and HEAD, which must agree) `name`'s manifest `reference` with one
/// `Accept` header per type; for a 200, the body must hash to the digest.
async fn manifest_with_accept(kura: &Kura, name: &str, reference: &str, accept: &[&str]) -> Answer {
    let url = format!("{}/v2/{name}/manifests/{reference}", kura.url());
    let mut answers = Vec::new();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let mut request = client().request(method.clone(), &url);
        for media_type in accept {
            request = request.header("accept", *media_type);
        }
        let response = request.send().await.unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map_or("", |v| v.to_str().unwrap())
                .to_owned()
        };
        let (status, content_type, digest) = (
            response.status(),
            header("content-type"),
            header("docker-content-digest"),
        );
        let digest = match (status, method == reqwest::Method::GET) {
            (StatusCode::OK, true) => {
                let body = response.bytes().await.unwrap();
                assert_eq!(sha256_digest(&body), digest, "{url} {accept:?}");
                digest
            }
            (StatusCode::OK, false) => digest,
            (_, true) => error_code(response).await,
            (_, false) => String::new(),
        };
        answers.push(Answer {
            status,
            digest,
            content_type: if status == StatusCode::OK {
                content_type
            } else {
                String::new()
            },
        });
    }
    let head = answers.pop().unwrap();
    let get = answers.pop().unwrap();
    assert_eq!(head.status, get.status, "HEAD and GET of {url} {accept:?}");
    if get.status == StatusCode::OK {
        assert_eq!(head, get, "HEAD and GET of {url} {accept:?}");
    }
    get
}

fn served(digest: &str, content_type: &str) -> Answer {
    Answer {
        status: StatusCode::OK,
        digest: digest.to_owned(),
        content_type: content_type.to_owned(),
    }
}

fn unknown() -> Answer {
    Answer {
        status: StatusCode::NOT_FOUND,
        digest: "MANIFEST_UNKNOWN".to_owned(),
        content_type: String::new(),
    }
}

/// A GET with no `Accept` header at all (reqwest always sends one); the
/// `Docker-Content-Digest` of the answer.
async fn digest_without_accept(kura: &Kura, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(kura.addr()).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: kura\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    response
        .lines()
        .find_map(|line| line.strip_prefix("docker-content-digest: "))
        .unwrap_or_else(|| panic!("{path}: no digest in {response}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_cannot_read_a_list_gets_the_linux_amd64_manifest() {
    let upstream = Upstream::anonymous().await;
    let seeded = support::seed_all(&upstream).await;
    let arm_only = ImageBuild::synthetic(
        Flavor::Docker,
        Platform::linux("arm64", Some("v8")),
        "armonly",
        1,
    );
    let arm_only = push_index(
        &upstream.client(),
        "multiarch/armonly",
        "latest",
        Flavor::Docker,
        &[arm_only],
    )
    .await;
    let kura = Kura::start(KuraOptions::for_upstream(&upstream)).await;
    let (list, index) = (&seeded.docker_list, &seeded.oci_index);
    let (list_amd64, index_amd64) = (list.child("amd64"), index.child("amd64"));
    let all = [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST,
    ];
    let ask = |name: &'static str, reference: String, accept: &'static [&'static str]| {
        let kura = &kura;
        async move { manifest_with_accept(kura, name, &reference, accept).await }
    };

    // Docker schema 2 only (an old Docker): the amd64 image of a Docker
    // list by tag; the list itself by digest (nothing else has its digest).
    let schema2: &[&str] = &[DOCKER_MANIFEST];
    assert_eq!(
        ask("multiarch/dockerlist", "latest".into(), schema2).await,
        served(&list_amd64.digest, DOCKER_MANIFEST)
    );
    assert_eq!(
        ask("multiarch/dockerlist", list.digest.clone(), schema2).await,
        served(&list.digest, DOCKER_MANIFEST_LIST)
    );
    // An OCI index: its amd64 OCI manifest for a client that reads those,
    // 404 for one that reads neither (what Distribution answers it).
    assert_eq!(
        ask("multiarch/oci", "latest".into(), &[OCI_MANIFEST]).await,
        served(&index_amd64.digest, OCI_MANIFEST)
    );
    assert_eq!(
        ask("multiarch/oci", "latest".into(), schema2).await,
        unknown()
    );
    assert_eq!(
        ask("multiarch/oci", index.digest.clone(), &[OCI_MANIFEST]).await,
        unknown()
    );
    // A list without linux/amd64 has nothing to offer such a client.
    assert_eq!(
        ask("multiarch/armonly", "latest".into(), schema2).await,
        unknown()
    );
    assert_eq!(
        ask(
            "multiarch/armonly",
            arm_only.digest.clone(),
            &[DOCKER_MANIFEST_LIST]
        )
        .await,
        served(&arm_only.digest, DOCKER_MANIFEST_LIST)
    );

    // Clients that accept lists, or name no manifest type at all, get
    // what is stored; Kura never rewrites a manifest.
    let as_stored = [
        ("multiarch/dockerlist", &list.digest, DOCKER_MANIFEST_LIST),
        ("multiarch/oci", &index.digest, OCI_INDEX),
        (
            "library/multilayer",
            &seeded.multilayer.digest,
            DOCKER_MANIFEST,
        ),
    ];
    for (name, digest, media_type) in as_stored {
        for accept in [&all[..], &["*/*"], &["application/json"]] {
            let answer = manifest_with_accept(&kura, name, "latest", accept).await;
            assert_eq!(answer, served(digest, media_type), "{name} {accept:?}");
        }
        let path = format!("/v2/{name}/manifests/latest");
        assert_eq!(&digest_without_accept(&kura, &path).await, digest, "{path}");
    }
    // A Docker image to an OCI-only client: as stored (Distribution would
    // rewrite it as schema 1).
    assert_eq!(
        ask(
            "library/multilayer",
            "latest".into(),
            &[OCI_MANIFEST, OCI_INDEX]
        )
        .await,
        served(&seeded.multilayer.digest, DOCKER_MANIFEST)
    );
}
