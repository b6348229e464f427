//! The container image: `packaging/build-image` builds the FROM-scratch image (static binary) in a
//! private podman store, then the image runs rootful with host networking and must
//! - answer `GET /v2/` with 200, as uid/gid 65532;
//! - resolve its upstream's host name through DNS (a static glibc binary in an image with no
//!   NSS modules and no nsswitch.conf): a stub DNS server on 127.53.0.1:53 answers for the
//!   upstream's name, and a real Distribution registry behind that name is pulled through;
//! - write the cache into its `/var/lib/kura` volume (owned by 65532);
//! - stop promptly and cleanly on `podman stop` (SIGTERM to PID 1).
//!
//! Two settings are for this test machine rather than for the image: `--runtime runc` (crun 1.8
//! refuses the hybrid cgroup v1/v2 layout here) and explicit low `--ulimit`s (podman's rootful
//! defaults raise RLIMIT_NOFILE/NPROC, which the runtime may not do here).

mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::images::{Flavor, ImageBuild, Platform};
use support::process::{ChildGuard, run_tool_ok};
use support::*;

/// Static build from scratch (dependencies included) plus `podman build`.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CACHE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// `podman stop -t` grace period; Kura must exit well before it.
const STOP_GRACE_SECS: u64 = 20;
const IMAGE: &str = "kura:test";
const UPSTREAM_HOST: &str = "upstream.kura.test";
/// Where the stub DNS server listens (port 53: resolv.conf cannot name another port).
const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 53, 0, 1);
const IMAGE_UID: u32 = 65532;

#[tokio::test(flavor = "multi_thread")]
async fn scratch_image_serves_as_non_root_and_pulls_through_a_dns_named_upstream() {
    let started = Instant::now();
    let podman = PodmanStore::new();

    // 1. Build the image (static binary, profile `image`: release without LTO).
    let build_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build-image");
    let mut build = Command::new("bash");
    build
        .arg(&build_script)
        .arg("--root")
        .arg(podman.dir.path())
        .args(["--tag", IMAGE, "--profile", "image"]);
    let built = run_tool_ok(build, BUILD_TIMEOUT);
    eprintln!("{}", built.stderr);
    assert!(
        built.stderr.contains("statically linked") || built.stderr.contains("static-pie linked"),
        "build-image did not report a static binary:\n{}",
        built.stderr
    );
    eprintln!("image built after {:?}", started.elapsed());

    // 2. A real upstream with one small image, reachable only by its DNS name.
    let upstream = Upstream::anonymous().await;
    let pushed = ImageBuild::synthetic(Flavor::Oci, Platform::linux("amd64", None), "image", 2)
        .push(&upstream.client(), "packaging/app", Some("v1"))
        .await;
    let dns = StubDns::start(UPSTREAM_HOST, Ipv4Addr::LOCALHOST);
    let resolv_conf = podman.dir.path().join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {DNS_ADDR}\n")).expect("write resolv.conf");

    // 3. Run it.
    let port = free_port();
    let upstream_url = format!("http://{UPSTREAM_HOST}:{}", upstream.addr().port());
    let mut container = podman.run(
        &[
            "--network",
            "host",
            "-v",
            &format!("{}:/etc/resolv.conf:ro", resolv_conf.display()),
        ],
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &upstream_url,
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let ready = wait_http(
        &format!("{base}/v2/"),
        READY_TIMEOUT,
        |s| s == StatusCode::OK,
        || container.check_running(),
    )
    .await;
    if let Err(e) = ready {
        panic!("{e}\ncontainer log:\n{}", container.log());
    }

    // 4. Non-root: the container's PID 1 as the host sees it (rootful: no user namespace).
    let pid = podman.inspect(&container.name, "{{.State.Pid}}");
    let status_file = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status_file
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
            .split_whitespace()
            .map(|id| id.parse().expect("numeric id"))
            .collect();
        assert_eq!(ids, vec![IMAGE_UID; 4], "{field} of the container's kura");
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("read comm");
    assert_eq!(comm.trim(), "kura");

    // 5. Pull through: the upstream's name resolves via DNS inside the scratch image.
    let mirror = RegistryClient::new(&base, Auth::Anonymous);
    let manifest = mirror.get_manifest("packaging/app", "v1").await;
    assert_eq!(manifest.digest, pushed.digest);
    for layer in &pushed.layers {
        mirror.get_blob("packaging/app", &layer.digest).await;
    }
    assert!(
        dns.answered() > 0,
        "the stub DNS server answered no query for {UPSTREAM_HOST}"
    );

    // 6. The cache landed in the volume, written by uid 65532.
    let volume = PathBuf::from(podman.inspect(
        &container.name,
        r#"{{range .Mounts}}{{if eq .Destination "/var/lib/kura"}}{{.Source}}{{end}}{{end}}"#,
    ));
    assert!(volume.is_dir(), "no /var/lib/kura volume: {volume:?}");
    let layer_hex = pushed.layers[0].digest.trim_start_matches("sha256:");
    let deadline = Instant::now() + CACHE_WRITE_TIMEOUT;
    let files = loop {
        let files = regular_files(&volume);
        if files.iter().any(|f| f.ends_with(layer_hex)) {
            break files;
        }
        assert!(
            Instant::now() < deadline,
            "layer {layer_hex} not cached in the volume {volume:?}; files: {files:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for file in &files {
        let uid = std::fs::metadata(file).expect("stat cached file").uid();
        assert_eq!(uid, IMAGE_UID, "owner of {file:?}");
    }

    // 7. SIGTERM to PID 1 stops it cleanly, long before podman's grace period runs out.
    let stop_started = Instant::now();
    podman.run_ok(&["stop", "-t", &STOP_GRACE_SECS.to_string(), &container.name]);
    let stop_took = stop_started.elapsed();
    assert!(
        stop_took < Duration::from_secs(STOP_GRACE_SECS / 2),
        "podman stop took {stop_took:?}: SIGTERM was not handled"
    );
    let exit_code = podman.inspect(&container.name, "{{.State.ExitCode}}");
    assert_eq!(
        exit_code,
        "0",
        "exit code after SIGTERM; log:\n{}",
        container.log()
    );
    eprintln!("packaging test took {:?}", started.elapsed());
}

/// Every regular file under `dir`.
fn regular_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files
}

/// A private podman store (vfs) in a temp dir, removed on drop.
struct PodmanStore {
    binary: PathBuf,
    dir: tempfile::TempDir,
}

impl PodmanStore {
    fn new() -> Self {
        let binary = require_tool("podman");
        if !["/usr/sbin/runc", "/usr/bin/runc"]
            .iter()
            .any(|p| Path::new(p).exists())
        {
            panic!(
                "required tool `runc` is missing: install the Debian package `runc` \
                 (.ci/run installs it; tests never skip silently)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("kura-image-")
            .tempdir()
            .expect("podman store temp dir");
        Self { binary, dir }
    }

    /// `podman` with this store's global options (the same as `packaging/build-image` uses).
    fn command(&self) -> Command {
        let root = self.dir.path();
        let mut cmd = Command::new(&self.binary);
        cmd.env("TMPDIR", root.join("tmp"))
            .arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("runroot"))
            .arg("--tmpdir")
            .arg(root.join("libpod"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"]);
        cmd
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.command();
        cmd.args(args);
        run_tool_ok(cmd, PODMAN_TIMEOUT).stdout.trim().to_owned()
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        self.run_ok(&["inspect", "--format", format, container])
    }

    /// `podman run IMAGE SERVE_ARGS` in the foreground, as a guarded child.
    fn run(&self, podman_args: &[&str], serve_args: &[&str]) -> Container<'_> {
        let name = format!("kura-packaging-test-{}", std::process::id());
        let mut cmd = self.command();
        cmd.args(["run", "--name", &name, "--runtime", "runc"])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(podman_args)
            .arg(IMAGE)
            .args(serve_args);
        let log = self.dir.path().join("container.log");
        let process = ChildGuard::spawn("podman run", cmd, &log);
        Container {
            store: self,
            name,
            process: Some(process),
        }
    }
}

/// A container started by [`PodmanStore::run`]: removed (with its volume) on drop.
struct Container<'a> {
    store: &'a PodmanStore,
    name: String,
    process: Option<ChildGuard>,
}

impl Container<'_> {
    fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    /// `Err` (with the log) once `podman run` has exited.
    fn check_running(&mut self) -> Result<(), String> {
        self.process
            .as_mut()
            .expect("container process")
            .check_running()
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        // Never panics (this may run during unwinding); bounded.
        let mut cmd = self.store.command();
        cmd.args(["rm", "--force", "--volumes", "--time", "0", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Ok(mut child) = cmd.spawn() {
            let deadline = Instant::now() + PODMAN_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(self.process.take());
    }
}

/// A minimal DNS server on `DNS_ADDR:53` (UDP): `A` queries for one name get one address, `AAAA`
/// for it gets an empty answer, anything else NXDOMAIN. Stopped on drop.
struct StubDns {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl StubDns {
    fn start(name: &str, address: Ipv4Addr) -> Self {
        let socket = UdpSocket::bind(SocketAddr::from((DNS_ADDR, 53))).unwrap_or_else(|e| {
            panic!("bind the stub DNS server to {DNS_ADDR}:53 (needs root): {e}")
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("set_read_timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let name = name.to_ascii_lowercase();
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((reply, hit)) = dns_reply(&buf[..len], &name, address) {
                        if hit {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// How many `A`/`AAAA` queries for the name were answered.
    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The reply to one query (and whether it was for `name`), or `None` for a malformed packet.
fn dns_reply(query: &[u8], name: &str, address: Ipv4Addr) -> Option<(Vec<u8>, bool)> {
    const A: u16 = 1;
    const AAAA: u16 = 28;
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = &query[12..at + 4];
    let hit = labels.join(".") == name && (qtype == A || qtype == AAAA);
    let answers: u16 = u16::from(hit && qtype == A);
    let rcode: u16 = if hit { 0 } else { 3 };
    // QR, opcode 0, AA, RD copied from the query, RA.
    let flags = 0x8400 | (u16::from(query[2] & 0x01) << 8) | 0x0080 | rcode;
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&query[..2]);
    for field in [flags, 1, answers, 0, 0] {
        reply.extend_from_slice(&field.to_be_bytes());
    }
    reply.extend_from_slice(question);
    if answers == 1 {
        reply.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question
        for field in [A, 1] {
            reply.extend_from_slice(&field.to_be_bytes());
        }
        reply.extend_from_slice(&60u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&address.octets());
    }
    Some((reply, hit))
}
