//! The dashboard at `/` and its JSON API, seen the way an operator sees
//! them: Debian's `chromium` renders the page of a Kura holding real
//! content (pulled through it by skopeo from a real Distribution), and the
//! tests read the rendered DOM. A stub upstream (`tests/support/stalling.rs`)
//! supplies what a real registry cannot on cue: Docker Hub's allowance
//! headers and a download that stays in flight.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::StatusCode;
use support::process::{require_tool, run_tool_ok};
use support::stalling::{RATE_LIMIT, RATE_WINDOW};
use support::{Kura, KuraOptions, StallingUpstream, Upstream, seed_all, skopeo_copy};

/// The stub's registry name in Kura's `upstreams:` list.
const STUB: &str = "stub.local";
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// Headless chromium on `url`: the DOM after scripts ran (5 s of virtual
/// time), and with `screenshot` a PNG of the page there.
async fn render(url: &str, scratch: &Path, screenshot: Option<&Path>) -> String {
    let chromium = require_tool("chromium");
    let profile = tempfile::tempdir_in(scratch).unwrap();
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--virtual-time-budget=5000",
        "--window-size=1280,2000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(png) => cmd.arg(format!("--screenshot={}", png.display())),
        None => cmd.arg("--dump-dom"),
    };
    cmd.arg(url);
    let output = tokio::task::spawn_blocking(move || run_tool_ok(cmd, CHROMIUM_TIMEOUT))
        .await
        .unwrap();
    output.stdout
}

/// The element (`<tag ...marker...>...</tag>`) around the first
/// occurrence of `marker` in `dom`; panics with the DOM if there is none.
fn element<'a>(dom: &'a str, tag: &str, marker: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not rendered in:\n{dom}"));
    let start = dom[..at].rfind(&format!("<{tag}")).expect("opening tag");
    let end = at + dom[at..].find(&format!("</{tag}>")).expect("closing tag");
    &dom[start..end]
}

/// The number in `attribute="N"` of `html`.
fn number(html: &str, attribute: &str) -> u64 {
    let pattern = format!("{attribute}=\"");
    let at = html
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {attribute} in {html}"))
        + pattern.len();
    let digits: String = html[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// The text of an element [`element`] found (no children).
fn text(element: &str) -> &str {
    element.split_once('>').map_or("", |(_, text)| text)
}

async fn api(kura: &Kura, path: &str) -> serde_json::Value {
    kura.get_json(&format!("/kura/api/v1/{path}")).await
}

/// Polls `path` of the API (10 s at most) until `ready` holds.
async fn wait_api(kura: &Kura, path: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = api(kura, path).await;
        if ready(&body) {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never got there: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_cached_images_downloads_hits_and_the_pull_allowance() {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    let stub = StallingUpstream::start();
    let scratch = tempfile::tempdir().unwrap();
    let config = write(
        scratch.path(),
        "kura.yml",
        &format!(
            "version: 0.1\nupstreams:\n  - name: {STUB}\n    remoteurl: {}\n\
             cache:\n  maxsize: 1GiB\n  gcinterval: 1s\n",
            stub.url()
        ),
    );
    let mut options = KuraOptions::for_upstream(&upstream);
    options.extra_args.push(config.display().to_string());
    let kura = Kura::start(options).await;
    let page = format!("{}/", kura.url());

    // Real content: one image and one OCI index with both platforms.
    let image = &seeded.multilayer;
    skopeo_copy(
        kura.addr(),
        &image.reference(),
        &scratch.path().join("cold"),
        false,
    );
    let index = &seeded.oci_index;
    skopeo_copy(
        kura.addr(),
        &index.reference(),
        &scratch.path().join("index"),
        true,
    );
    kura.wait_downloads_settled().await;
    // Docker Hub's allowance, as the stub reports it after one counted pull.
    let limited = kura
        .get(&format!("/v2/{STUB}/limited/app/manifests/latest"))
        .await;
    assert_eq!(limited.status(), StatusCode::OK);
    // A blob that trickles in: its download stays in flight.
    let trickling = format!(
        "{}/v2/{STUB}/trickle/app/blobs/sha256:{}",
        kura.url(),
        "ab".repeat(32)
    );
    let follower = tokio::spawn(async move {
        let client = support::net::http_client(Duration::from_secs(120));
        let response = client.get(&trickling).send().await.expect("blob answered");
        let mut body = response.bytes_stream();
        while body.next().await.is_some() {}
    });
    wait_api(&kura, "downloads", |d| {
        d["downloads"][0]["received"].as_u64() > Some(0)
    })
    .await;
    wait_api(&kura, "cache", |c| !c["last_collection"].is_null()).await;

    let cold = render(&page, scratch.path(), None).await;
    let stub_row = element(&cold, "tr", &format!("data-upstream=\"{STUB}\""));
    let remaining = RATE_LIMIT - 1;
    let hours = RATE_WINDOW / 3600;
    assert!(
        stub_row.contains(&format!("{remaining} / {RATE_LIMIT} left per {hours} h")),
        "{stub_row}"
    );
    for repository in [
        image.repository.as_str(),
        &index.repository,
        &format!("{STUB}/limited/app"),
    ] {
        element(&cold, "a", &format!("data-repo=\"{repository}\""));
    }
    let download = element(&cold, "tr", "data-digest=\"sha256:abab");
    assert!(
        number(download, "data-received") > 0,
        "no progress: {download}"
    );
    assert_eq!(number(download, "data-total"), 1 << 20);
    assert!(download.contains("of 1.0 MiB"), "{download}");
    assert_eq!(text(element(download, "td", "num followers")), "1");
    assert!(
        element(&cold, "div", "id=\"cache-gc\"").contains("removed 0 manifests"),
        "no collection shown"
    );
    let hits_before = number(
        element(&cold, "tr", "data-upstream=\"proxy\""),
        "data-pulls",
    );

    // The tags of the image, with the size its manifest declares.
    let tags = render(
        &format!("{page}#/repo/{}", image.repository),
        scratch.path(),
        None,
    )
    .await;
    let latest = element(&tags, "tr", "data-tag=\"latest\"");
    assert_eq!(number(latest, "data-bytes"), image.blob_bytes(), "{latest}");
    assert!(latest.contains(&image.digest[7..19]), "{latest}");
    // Drill-down: the index's platforms, each cached and sized.
    let platforms = render(
        &format!("{page}#/manifest/{}@{}", index.repository, index.digest),
        scratch.path(),
        None,
    )
    .await;
    for architecture in ["amd64", "arm64"] {
        let child = index.child(architecture);
        let row = element(
            &platforms,
            "tr",
            &format!("data-digest=\"{}\"", child.digest),
        );
        assert!(row.contains(&format!("linux/{architecture}")), "{row}");
        assert!(row.contains("cached"), "{row}");
        assert_eq!(number(row, "data-bytes"), child.blob_bytes(), "{row}");
    }

    // A warm pull moves the hit counters.
    skopeo_copy(
        kura.addr(),
        &image.reference(),
        &scratch.path().join("warm"),
        false,
    );
    let warm = render(&page, scratch.path(), None).await;
    let hits_after = number(
        element(&warm, "tr", "data-upstream=\"proxy\""),
        "data-pulls",
    );
    let blobs = image.layers.len() as u64 + 1;
    assert!(
        hits_after - hits_before >= blobs,
        "hits {hits_before} -> {hits_after}"
    );

    let screenshot = scratch.path().join("dashboard.png");
    render(&page, scratch.path(), Some(&screenshot)).await;
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 0);
    if let Ok(keep) = std::env::var("KURA_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
    println!("screenshot: {}", screenshot.display());
    follower.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_browser_gets_the_challenge_not_the_page() {
    let scratch = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("let-me-in", 6).unwrap();
    let htpasswd = write(scratch.path(), "htpasswd", &format!("alice:{hash}\n"));
    let config = write(
        scratch.path(),
        "kura.yml",
        &format!(
            "auth:\n  htpasswd:\n    realm: kura-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let mut options = KuraOptions::new("http://127.0.0.1:9");
    options.extra_args.push(config.display().to_string());
    let kura = Kura::start(options).await;
    let client = support::net::http_client(Duration::from_secs(30));

    for path in ["/", "/kura/dashboard.js", "/kura/api/v1/upstreams"] {
        let url = format!("{}{path}", kura.url());
        let refused = client.get(&url).send().await.unwrap();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            refused.headers()["www-authenticate"],
            "Basic realm=\"kura-test\""
        );
        let allowed = client
            .get(&url)
            .basic_auth("alice", Some("let-me-in"))
            .send()
            .await
            .unwrap();
        assert_eq!(allowed.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(kura.get("/healthz").await.status(), StatusCode::OK);

    // Headless chromium cannot answer the Basic prompt: it renders nothing.
    let dom = render(&format!("{}/", kura.url()), scratch.path(), None).await;
    assert!(!dom.contains("Upstreams"), "page shown: {dom}");
    let log = kura.log_text();
    let challenged = log
        .lines()
        .any(|line| line.contains("path=\"/\"") && line.contains("status=401"));
    assert!(challenged, "chromium was not challenged:\n{log}");
}

fn storage_catalog_refresh() -> Duration {
    kura::storage::catalog::REFRESH + Duration::from_millis(100)
}

/// A generated cache of 10,000 repositories: the first page comes from
/// the in-memory catalog, holds only `n` names, and `n` is capped.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_repositories_are_paged_not_listed_whole() {
    const REPOSITORIES: usize = 10_000;
    // 60,000 directories: on tmpfs where there is one, because creating
    // and removing them on a busy disk takes minutes.
    let cache = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    };
    let hex = "cd".repeat(32);
    for i in 0..REPOSITORIES {
        let revisions = cache.path().join(format!(
            "repositories/team{:02}/app{i:05}/_manifests/revisions/sha256",
            i % 100
        ));
        std::fs::create_dir_all(&revisions).unwrap();
        std::fs::write(
            revisions.join(&hex),
            "application/vnd.oci.image.manifest.v1+json",
        )
        .unwrap();
    }
    let mut options = KuraOptions::new("http://127.0.0.1:9");
    options.cache_dir = Some(cache.path().to_owned());
    let kura = Kura::start(options).await;

    let timed = async |path: &str| {
        let started = Instant::now();
        let body = tokio::time::timeout(Duration::from_secs(30), api(&kura, path))
            .await
            .expect("answered within 30 s");
        (body, started.elapsed())
    };
    let (first, listing) = timed("repositories?n=50").await;
    let (again, in_memory) = timed("repositories?n=50").await;
    // Past the catalog's freshness the kept names answer while a new
    // listing runs behind.
    tokio::time::sleep(storage_catalog_refresh()).await;
    let (stale, while_listing) = timed("repositories?n=50").await;
    println!(
        "first page of {REPOSITORIES} repositories: {listing:?} with the storage listing, \
         {in_memory:?} from memory, {while_listing:?} from memory while listing again"
    );
    assert_eq!(first, stale);
    assert_eq!(first, again);
    let names = first["repositories"].as_array().unwrap();
    assert_eq!(names.len(), 50);
    assert_eq!(names[0], "team00/app00000");
    assert_eq!(first["next"], names[49]);

    let (capped, _) = timed("repositories?n=100000").await;
    assert_eq!(capped["repositories"].as_array().unwrap().len(), 100);
    let (found, searched) = timed("repositories?q=app0999&n=100").await;
    println!("search over {REPOSITORIES} repositories: {searched:?}");
    assert_eq!(found["repositories"].as_array().unwrap().len(), 10);
    assert!(found["next"].is_null());

    let mut weight = 0;
    for asset in ["/", "/kura/dashboard.js", "/kura/dashboard.css"] {
        weight += kura.get(asset).await.bytes().await.unwrap().len();
    }
    println!("page weight: {weight} bytes");
    assert!(weight < 100 * 1024, "the page weighs {weight} bytes");
}
