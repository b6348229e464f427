//! The command-line toolbox on a real cache: `warm` fills it from a real
//! upstream, `ls`/`du` describe it, `gc --dry-run`/`gc` collect it, and
//! `verify` finds a deliberately corrupted blob.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::process::{ToolOutput, run_tool};
use support::{SeededImages, Upstream, seed_all};

fn kura(cache: &Path, upstream: &Upstream, args: &[&str], env: &[(&str, &str)]) -> ToolOutput {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kura"));
    command
        .args(args)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--upstream")
        .arg(upstream.url())
        .envs(env.iter().copied());
    run_tool(command, Duration::from_secs(120))
}

fn ok(output: ToolOutput, what: &str) -> String {
    assert!(
        output.success(),
        "{what} failed:\n{}\n{}",
        output.stdout,
        output.stderr
    );
    output.stdout
}

fn blob_path(cache: &Path, digest: &str) -> std::path::PathBuf {
    let hex = &digest["sha256:".len()..];
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

async fn seeded() -> (Upstream, SeededImages, tempfile::TempDir) {
    let upstream = Upstream::anonymous().await;
    let seeded = seed_all(&upstream).await;
    (upstream, seeded, tempfile::tempdir().unwrap())
}

/// A cache that `kura warm` filled with the multi-layer image.
async fn warmed() -> (
    Upstream,
    SeededImages,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let (upstream, seeded, dir) = seeded().await;
    let cache = dir.path().join("cache");
    let image = seeded.multilayer.reference();
    ok(kura(&cache, &upstream, &["warm", &image], &[]), "warm");
    (upstream, seeded, dir, cache)
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_fetches_every_platform_or_just_one() {
    let (upstream, seeded, dir) = seeded().await;
    let index = &seeded.oci_index;

    let all = dir.path().join("all");
    let out = ok(
        kura(&all, &upstream, &["warm", &index.reference()], &[]),
        "warm",
    );
    assert!(
        out.contains("linux/amd64") && out.contains("linux/arm64"),
        "{out}"
    );
    for digest in index.all_digests() {
        assert!(blob_path(&all, &digest).exists(), "{digest} not warmed");
    }

    let one = dir.path().join("one");
    let args = ["warm", "--platform", "linux/arm64", &index.reference()];
    ok(kura(&one, &upstream, &args, &[]), "warm --platform");
    for digest in index.child("arm64").all_digests() {
        assert!(blob_path(&one, &digest).exists(), "{digest} not warmed");
    }
    for digest in index.child("amd64").blob_digests() {
        assert!(
            !blob_path(&one, &digest).exists(),
            "{digest} of another platform was fetched"
        );
    }
    let again = ok(
        kura(&all, &upstream, &["warm", &index.reference()], &[]),
        "warm again",
    );
    assert!(
        again.contains("cached") && !again.contains("fetched"),
        "{again}"
    );
}

/// What the upstream was asked for, by digest: only the chosen platform's
/// manifest and blobs, each once; nothing of another platform.
#[tokio::test(flavor = "multi_thread")]
async fn warm_with_a_platform_asks_the_upstream_for_that_platform_only() {
    let (upstream, seeded, dir) = seeded().await;
    let index = &seeded.docker_list;
    let (amd64, arm64) = (index.child("amd64"), index.child("arm64"));
    let cache = dir.path().join("cache");
    let seeding = upstream.requests().len();
    // Referrers are warmed (and counted) in tests/referrers.rs.
    let args = [
        "warm",
        "--no-referrers",
        "--platform",
        "linux/amd64",
        &index.reference(),
    ];
    ok(kura(&cache, &upstream, &args, &[]), "warm --platform");
    let asked = upstream.requests().split_off(seeding);
    let count = |digest: &str| asked.iter().filter(|r| r.uri.contains(digest)).count();

    for digest in amd64.all_digests() {
        assert_eq!(count(&digest), 1, "{digest} of linux/amd64: {asked:?}");
    }
    for digest in arm64.all_digests() {
        assert_eq!(count(&digest), 0, "{digest} of linux/arm64: {asked:?}");
    }
    let blobs = asked.iter().filter(|r| r.uri.contains("/blobs/")).count();
    assert_eq!(blobs, amd64.blob_digests().len(), "{asked:?}");

    // A platform the index does not have is an error, not a guess.
    let before = upstream.requests().len();
    let args = ["warm", "--platform", "linux/s390x", &index.reference()];
    let output = kura(&cache, &upstream, &args, &[]);
    assert!(!output.success(), "{}", output.stdout);
    assert!(
        output.stderr.contains("no linux/s390x manifest"),
        "{}",
        output.stderr
    );
    let asked = upstream.requests().split_off(before);
    assert!(
        asked.iter().all(|r| !r.uri.contains("/blobs/")),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ls_du_gc_describe_and_collect_the_cache() {
    let (upstream, seeded, _dir, cache) = warmed().await;
    let image = &seeded.multilayer;

    let listing = ok(kura(&cache, &upstream, &["ls"], &[]), "ls");
    let line = listing
        .lines()
        .find(|l| l.starts_with(&image.repository))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(
        line.contains("latest") && line.contains(&image.digest[..19]),
        "{line}"
    );
    let usage = ok(kura(&cache, &upstream, &["du"], &[]), "du");
    assert!(
        usage.contains(&format!("{} blobs", image.all_digests().len())),
        "{usage}"
    );

    // With a 1 s TTL and no grace, everything is stale a moment later.
    std::thread::sleep(Duration::from_millis(1500));
    let expire = [
        ("REGISTRY_PROXY_TTL", "1s"),
        ("REGISTRY_CACHE_GCGRACE", "0"),
    ];
    let dry = ok(
        kura(&cache, &upstream, &["gc", "--dry-run"], &expire),
        "gc --dry-run",
    );
    assert!(dry.contains("would free"), "{dry}");
    assert!(
        dry.contains(&format!("manifest {}@{}", image.repository, image.digest)),
        "{dry}"
    );
    assert!(
        blob_path(&cache, &image.layers[0].digest).exists(),
        "dry run deleted something"
    );

    // What a server killed mid-download leaves: its staging directory,
    // the lock file no longer held.
    let abandoned = cache.join("staging").join("1-0-abandoned");
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join(kura::storage::staging::LOCK_FILE), b"").unwrap();
    std::fs::write(abandoned.join("download"), b"never committed").unwrap();
    let real = ok(kura(&cache, &upstream, &["gc"], &expire), "gc");
    assert!(real.contains("freed"), "{real}");
    assert!(!abandoned.exists(), "gc left a stopped process's staging");
    for digest in image.all_digests() {
        assert!(!blob_path(&cache, &digest).exists(), "{digest} survived gc");
    }
    let listing = ok(kura(&cache, &upstream, &["ls"], &[]), "ls after gc");
    assert!(!listing.contains(&image.repository), "{listing}");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_and_removes_a_corrupted_blob() {
    let (upstream, seeded, _dir, cache) = warmed().await;
    let image = &seeded.multilayer;
    let clean = ok(kura(&cache, &upstream, &["verify"], &[]), "verify");
    assert!(clean.contains(": 0 corrupt"), "{clean}");

    let victim = blob_path(&cache, &image.layers[1].digest);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();

    let report = kura(&cache, &upstream, &["verify", "--dry-run"], &[]);
    assert!(
        !report.success(),
        "a corrupt blob must fail verify --dry-run"
    );
    assert!(
        report
            .stdout
            .contains(&format!("corrupt {}", image.layers[1].digest))
    );
    assert!(victim.exists());

    let fixed = ok(kura(&cache, &upstream, &["verify"], &[]), "verify");
    assert!(
        fixed.contains("(removed)") && fixed.contains(": 1 corrupt"),
        "{fixed}"
    );
    assert!(!victim.exists());
    // Warming again restores a good copy from upstream.
    ok(
        kura(&cache, &upstream, &["warm", &image.reference()], &[]),
        "re-warm",
    );
    let clean = ok(
        kura(&cache, &upstream, &["verify"], &[]),
        "verify after re-warm",
    );
    assert!(clean.contains(": 0 corrupt"), "{clean}");
}
