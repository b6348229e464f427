//! Real registry clients (skopeo, podman, containerd's ctr) run against a mirror on 127.0.0.1.
//!
//! These functions block the calling thread while the tool runs (bounded by [`TOOL_TIMEOUT`]); the
//! servers in this module tree run on their own threads, so calling them from a tokio test is fine.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::images::sha256_digest;
use super::process::{ChildGuard, ToolOutput, require_tool, run_tool, run_tool_ok};

/// Upper bound for one client tool run (a 256 MiB pull in a debug build included).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(180);
/// The registry name podman and containerd pull from; its own location is a dead port, so only
/// the mirror can serve it.
pub const MIRRORED_REGISTRY: &str = "upstream.test";
const DEAD_LOCATION: &str = "127.0.0.1:1";
const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(20);
const CONTAINERD_NAMESPACE: &str = "test";

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

// ----------------------------------------------------------------------------------------------
// skopeo

/// Manifests and blobs that a copy left in a local layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandedContent {
    /// Digest of the top-level manifest (the index/list itself when copied with `--all`).
    pub top_digest: String,
    /// Every manifest and blob digest present (top-level manifest included).
    pub digests: BTreeSet<String>,
}

/// `skopeo copy --preserve-digests` of `docker://ADDR/IMAGE_REF` into `dest_dir` (must not exist
/// yet or be empty). With `all` (`--all`: every platform of an index or list) the destination is a
/// `dir:` layout, because skopeo cannot write a Docker manifest list to `oci:` while preserving
/// digests; a single image goes to `oci:DIR[:TAG]`. Returns what landed.
pub fn skopeo_copy(
    src_registry_addr: impl Display,
    image_ref: &str,
    dest_dir: &Path,
    all: bool,
) -> LandedContent {
    skopeo_copy_as(src_registry_addr, image_ref, dest_dir, all, None)
}

/// [`skopeo_copy`] logged in with `--src-creds user:password` when given.
pub fn skopeo_copy_as(
    src_registry_addr: impl Display,
    image_ref: &str,
    dest_dir: &Path,
    all: bool,
    credentials: Option<(&str, &str)>,
) -> LandedContent {
    let destination = if all {
        format!("dir:{}", dest_dir.display())
    } else {
        match tag_of(image_ref) {
            Some(tag) => format!("oci:{}:{tag}", dest_dir.display()),
            None => format!("oci:{}", dest_dir.display()),
        }
    };
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
        .arg("--src-tls-verify=false")
        .args(all.then_some("--all"))
        .args(credentials.map(|(user, password)| format!("--src-creds={user}:{password}")))
        .arg(format!("docker://{src_registry_addr}/{image_ref}"))
        .arg(destination);
    run_tool_ok(cmd, TOOL_TIMEOUT);
    landed_content(dest_dir)
}

/// The tag of `name:tag` (`None` for `name@digest` or a bare name).
fn tag_of(image_ref: &str) -> Option<&str> {
    if image_ref.contains('@') {
        return None;
    }
    let (_, last) = image_ref.rsplit_once('/').unwrap_or(("", image_ref));
    last.split_once(':').map(|(_, tag)| tag)
}

/// Reads an `oci:` layout (`index.json` + `blobs/sha256/`) or a `dir:` layout (`manifest.json`,
/// `HEX.manifest.json` per instance, blobs named by hex).
pub fn landed_content(dir: &Path) -> LandedContent {
    if dir.join("index.json").exists() {
        oci_layout_content(dir)
    } else if dir.join("manifest.json").exists() {
        dir_layout_content(dir)
    } else {
        panic!("{} holds neither an oci: nor a dir: layout", dir.display());
    }
}

fn oci_layout_content(dir: &Path) -> LandedContent {
    let index = read_json(&dir.join("index.json"));
    let top_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no manifest in {}/index.json: {index}", dir.display()))
        .to_owned();
    let digests = file_names(&dir.join("blobs/sha256"))
        .map(|hex| format!("sha256:{hex}"))
        .collect();
    LandedContent {
        top_digest,
        digests,
    }
}

fn dir_layout_content(dir: &Path) -> LandedContent {
    let manifest = std::fs::read(dir.join("manifest.json")).expect("read manifest.json");
    let top_digest = sha256_digest(&manifest);
    let mut digests: BTreeSet<String> = file_names(dir)
        .filter_map(|name| {
            let hex = name.strip_suffix(".manifest.json").unwrap_or(&name);
            is_sha256_hex(hex).then(|| format!("sha256:{hex}"))
        })
        .collect();
    digests.insert(top_digest.clone());
    LandedContent {
        top_digest,
        digests,
    }
}

fn is_sha256_hex(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn file_names(dir: &Path) -> impl Iterator<Item = String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn parse_json(text: &str, what: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

// ----------------------------------------------------------------------------------------------
// podman

/// What podman recorded for a pulled image.
#[derive(Clone, Debug)]
pub struct PodmanImage {
    /// `sha256:` + image ID (the config digest).
    pub id: String,
    /// Digest of the manifest pulled by tag (for an index/list: the index/list itself).
    pub digest: String,
    /// Every manifest digest podman associates with the image (top-level and instance).
    pub repo_digests: BTreeSet<String>,
    /// `RootFS.Layers`: the uncompressed layer digests (diff_ids).
    pub diff_ids: Vec<String>,
}

/// Pulls `upstream.test/IMAGE` with a fresh, private podman store (vfs) whose registries.conf
/// sends `upstream.test` to `mirror_addr` (plain HTTP) and its own location to a dead port.
pub fn podman_pull(mirror_addr: impl Display, image: &str) -> PodmanImage {
    podman_pull_via(MIRRORED_REGISTRY, &mirror_addr.to_string(), image)
}

/// Pulls `REGISTRY/IMAGE` where registries.conf sends `registry` to the
/// mirror `location` (which may carry a path, e.g. `127.0.0.1:5000/ghcr.io`).
pub fn podman_pull_via(registry: &str, location: &str, image: &str) -> PodmanImage {
    let dir = temp_dir("kura-podman-");
    let podman = Podman::new(dir.path(), registry, location);
    let reference = format!("{registry}/{image}");
    podman.run(&["pull", "--quiet", &reference]);
    let inspect = podman.run(&["image", "inspect", "--format", "json", &reference]);
    parse_podman_inspect(&inspect.stdout)
}

/// [`podman_pull_via`] after `podman login` to the mirror's host (what a
/// user of a Kura with `auth.htpasswd` does); the credentials stay in the
/// temp dir's own auth file.
pub fn podman_login_pull_via(
    registry: &str,
    location: &str,
    image: &str,
    (user, password): (&str, &str),
) -> PodmanImage {
    let dir = temp_dir("kura-podman-");
    let podman = Podman::new(dir.path(), registry, location);
    let host = location.split('/').next().unwrap_or(location);
    podman.run(&[
        "login",
        "--tls-verify=false",
        "-u",
        user,
        "-p",
        password,
        host,
    ]);
    let reference = format!("{registry}/{image}");
    podman.run(&["pull", "--quiet", &reference]);
    let inspect = podman.run(&["image", "inspect", "--format", "json", &reference]);
    parse_podman_inspect(&inspect.stdout)
}

/// A podman invocation confined to one temp dir.
struct Podman {
    binary: PathBuf,
    dir: PathBuf,
}

impl Podman {
    fn new(dir: &Path, registry: &str, mirror: &str) -> Self {
        let registries = format!(
            "unqualified-search-registries = []\n\n[[registry]]\nprefix = \"{registry}\"\n\
             location = \"{DEAD_LOCATION}\"\n\n[[registry.mirror]]\nlocation = \"{mirror}\"\n\
             insecure = true\n"
        );
        std::fs::write(dir.join("registries.conf"), registries).expect("write registries.conf");
        let policy = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;
        std::fs::write(dir.join("policy.json"), policy).expect("write policy.json");
        std::fs::create_dir_all(dir.join("tmp")).expect("podman tmp dir");
        // Podman's own auth file (never the host's), which it insists exists.
        std::fs::write(dir.join("auth.json"), r#"{"auths":{}}"#).expect("write auth.json");
        Self {
            binary: require_tool("podman"),
            dir: dir.to_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> ToolOutput {
        let mut cmd = Command::new(&self.binary);
        cmd.env(
            "CONTAINERS_REGISTRIES_CONF",
            self.dir.join("registries.conf"),
        )
        .env("TMPDIR", self.dir.join("tmp"))
        .env("REGISTRY_AUTH_FILE", self.dir.join("auth.json"))
        .arg("--root")
        .arg(self.dir.join("root"))
        .arg("--runroot")
        .arg(self.dir.join("runroot"))
        .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
        .args(["--events-backend", "file"])
        .args(args);
        if args.first() == Some(&"pull") {
            cmd.arg("--signature-policy")
                .arg(self.dir.join("policy.json"));
        }
        run_tool_ok(cmd, TOOL_TIMEOUT)
    }
}

fn parse_podman_inspect(stdout: &str) -> PodmanImage {
    let inspect = parse_json(stdout, "podman image inspect");
    let image = &inspect[0];
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    PodmanImage {
        id: format!("sha256:{}", image["Id"].as_str().expect("podman Id")),
        digest: image["Digest"].as_str().expect("podman Digest").to_owned(),
        repo_digests: strings(&image["RepoDigests"])
            .iter()
            .filter_map(|r| r.split_once('@').map(|(_, d)| d.to_owned()))
            .collect(),
        diff_ids: strings(&image["RootFS"]["Layers"]),
    }
}

// ----------------------------------------------------------------------------------------------
// containerd

/// A private containerd (root, state and sockets in a temp dir, CRI disabled); killed on drop.
pub struct Containerd {
    // Field order is drop order: the daemon goes before its directory.
    process: ChildGuard,
    ctr: PathBuf,
    socket: PathBuf,
    dir: TempDir,
}

/// An image as containerd recorded it after a pull.
#[derive(Clone, Debug)]
pub struct CtrImage {
    /// The digest of the image's target (the manifest pulled by tag: index/list or image).
    pub target_digest: String,
    pub media_type: String,
    /// Every blob in this containerd's content store (all pulls so far): containerd fetches the
    /// index/list plus the host platform's manifest, config and layers.
    pub content_digests: BTreeSet<String>,
}

impl Containerd {
    /// Starts containerd and waits (bounded) until `ctr version` gets an answer.
    pub fn start() -> Self {
        let binary = require_tool("containerd");
        let ctr = require_tool("ctr");
        let dir = temp_dir("kura-containerd-");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, containerd_config(dir.path())).expect("write containerd config");
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&config);
        let process = ChildGuard::spawn("containerd", cmd, &dir.path().join("containerd.log"));
        let mut containerd = Self {
            process,
            ctr,
            socket,
            dir,
        };
        containerd.wait_ready();
        containerd
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Runs `ctr --address SOCK -n test ARGS...` (not asserting success).
    pub fn ctr(&self, args: &[&str]) -> ToolOutput {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", CONTAINERD_NAMESPACE])
            .args(args);
        run_tool(cmd, TOOL_TIMEOUT)
    }

    /// Like [`ctr`](Self::ctr), panicking with stderr and the daemon log unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> ToolOutput {
        let output = self.ctr(args);
        assert!(
            output.success(),
            "ctr {args:?} failed with {}\nstderr:\n{}\nstdout:\n{}\ncontainerd log:\n{}",
            output.status,
            output.stderr,
            output.stdout,
            self.log_text()
        );
        output
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + CONTAINERD_READY_TIMEOUT;
        loop {
            if let Err(e) = self.process.check_running() {
                panic!("containerd did not start: {e}");
            }
            if self.socket.exists() && self.ctr(&["version"]).success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd not ready after {CONTAINERD_READY_TIMEOUT:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A fresh `--hosts-dir` sending `registry` to `mirror` over plain HTTP.
    fn hosts_dir(&self, registry: &str, mirror: &str) -> TempDir {
        let hosts = tempfile::Builder::new()
            .prefix("hosts-")
            .tempdir_in(self.dir.path())
            .expect("hosts dir");
        let registry_dir = hosts.path().join(registry);
        std::fs::create_dir_all(&registry_dir).expect("create hosts dir");
        let toml = format!(
            "server = \"http://{DEAD_LOCATION}\"\n\n[host.\"http://{mirror}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n"
        );
        std::fs::write(registry_dir.join("hosts.toml"), toml).expect("write hosts.toml");
        hosts
    }

    fn image_record(&self, reference: &str) -> (String, String) {
        let listing = self.ctr_ok(&["images", "ls"]).stdout;
        listing
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|columns| columns.first() == Some(&reference))
            .map(|columns| (columns[2].to_owned(), columns[1].to_owned()))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{listing}"))
    }

    fn content_digests(&self) -> BTreeSet<String> {
        self.ctr_ok(&["content", "ls", "--quiet"])
            .stdout
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

fn containerd_config(dir: &Path) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
         [grpc]\n  address = \"{grpc}\"\n\n[ttrpc]\n  address = \"{ttrpc}\"\n\n\
         [debug]\n  address = \"{debug}\"\n",
        root = path("root"),
        state = path("state"),
        grpc = path("containerd.sock"),
        ttrpc = path("containerd.sock.ttrpc"),
        debug = path("debug.sock"),
    )
}

/// `ctr images pull --hosts-dir DIR upstream.test/IMAGE` where the hosts dir names `mirror_addr`
/// as a plain-HTTP pull/resolve mirror (containerd then adds `?ns=upstream.test` to every
/// request). The pull unpacks into the default overlayfs snapshotter, which works on these
/// machines.
pub fn ctr_pull(containerd: &Containerd, mirror_addr: impl Display, image: &str) -> CtrImage {
    ctr_pull_via(
        containerd,
        MIRRORED_REGISTRY,
        &mirror_addr.to_string(),
        image,
    )
}

/// Pulls `REGISTRY/IMAGE` with a hosts dir sending `registry` to `mirror`
/// (containerd then adds `?ns=REGISTRY` to every mirror request).
pub fn ctr_pull_via(
    containerd: &Containerd,
    registry: &str,
    mirror: &str,
    image: &str,
) -> CtrImage {
    ctr_pull_via_as(containerd, registry, mirror, image, None)
}

/// [`ctr_pull_via`] with `--user user:password` when given.
pub fn ctr_pull_via_as(
    containerd: &Containerd,
    registry: &str,
    mirror: &str,
    image: &str,
    credentials: Option<(&str, &str)>,
) -> CtrImage {
    let hosts = containerd.hosts_dir(registry, mirror);
    let reference = format!("{registry}/{image}");
    let hosts_dir = hosts.path().to_string_lossy().into_owned();
    let mut args = vec!["images", "pull", "--hosts-dir", &hosts_dir];
    let user = credentials.map(|(user, password)| format!("{user}:{password}"));
    if let Some(user) = &user {
        args.extend(["--user", user]);
    }
    args.push(&reference);
    containerd.ctr_ok(&args);
    let (target_digest, media_type) = containerd.image_record(&reference);
    CtrImage {
        target_digest,
        media_type,
        content_digests: containerd.content_digests(),
    }
}
