//! Child processes: locating tools, guards that kill on drop, running tools with a timeout.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a wait for a child to exit after SIGKILL may take.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
const REAP_POLL: Duration = Duration::from_millis(10);

/// The Debian package that provides `tool`, for error messages.
/// The command that installs a tool on a Debian machine.
fn install_command(tool: &str) -> &'static str {
    match tool {
        "docker-registry" => "apt-get install -y docker-registry",
        "skopeo" => "apt-get install -y skopeo",
        "podman" => "apt-get install -y podman",
        "containerd" | "ctr" => "apt-get install -y containerd",
        "htpasswd" => "apt-get install -y apache2-utils",
        "chromium" => "apt-get install -y chromium",
        "moto_server" => "pip install 'moto[server]'",
        "s3s-fs" => "cargo install s3s-fs --version 0.14.1 --features binary --locked",
        _ => "(unknown package)",
    }
}

/// Finds `name` on `PATH` (and in the usual sbin directories). Missing tools are never skipped:
/// this panics, with a hint that differs for CI (`CI=true`) and for a developer machine.
pub fn require_tool(name: &str) -> PathBuf {
    if let Some(path) = find_tool(name) {
        return path;
    }
    let install = install_command(name);
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "required tool `{name}` is missing on the CI machine: .ci/run must run `{install}` first"
        );
    }
    panic!(
        "required tool `{name}` is missing: install it with `{install}` (tests never skip silently)"
    );
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Opens `path` for appending (creating it), for a child's stdout/stderr.
fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// Waits at most `timeout` for `child` to exit.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(REAP_POLL);
    }
}

/// Sends SIGKILL and reaps the child (bounded).
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Some(status) = child.try_wait().ok().flatten() {
        return Some(status);
    }
    let _ = child.kill();
    wait_bounded(child, REAP_TIMEOUT)
}

/// Sends `signal` (a name such as `STOP`, `CONT`, `TERM`) to `pid` with `kill(1)`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("run kill -{signal} {pid}: {e}"));
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// A memory figure of a running process from `/proc/<pid>/status`, in
/// bytes: `VmRSS` (resident now) or `VmHWM` (peak resident since start or
/// since [`reset_peak_memory`]).
pub fn memory_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib * 1024
}

/// Resets a process's `VmHWM` to its current resident size (Linux
/// `clear_refs`), so a later peak is measured from now.
pub fn reset_peak_memory(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("reset peak memory of {pid}: {e}"));
}

/// A long-running child whose stdout and stderr are appended to a log file. Dropping the guard kills
/// the child (SIGKILL) and reaps it.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Self {
        let log = append_log(log_path);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id()
    }

    /// `Err(message)` if the child has exited (or was killed), `Ok` while it runs.
    pub fn check_running(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait().expect("try_wait") {
            None => Ok(()),
            Some(status) => Err(format!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_text()
            )),
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid(), signal);
    }

    /// SIGKILL + reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take()
            && kill_and_reap(&mut child).is_none()
        {
            eprintln!(
                "warning: {} (pid {}) did not exit after SIGKILL",
                self.name,
                child.id()
            );
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log_text(&self) -> String {
        read_lossy(&self.log_path)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a file as lossy UTF-8; a missing file reads as empty.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// What a finished tool run produced.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs `cmd` to completion with stdin closed, killing it after `timeout` (then panicking with its
/// stderr). Output goes through unnamed temp files, so a chatty tool can never block on a full pipe.
pub fn run_tool(mut cmd: Command, timeout: Duration) -> ToolOutput {
    let mut stdout = tempfile::tempfile().expect("temp file for stdout");
    let mut stderr = tempfile::tempfile().expect("temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("clone stdout"))
        .stderr(stderr.try_clone().expect("clone stderr"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let status = wait_bounded(&mut child, timeout);
    let status = status.unwrap_or_else(|| {
        kill_and_reap(&mut child);
        panic!(
            "{cmd:?} timed out after {timeout:?}; stderr:\n{}",
            rewind_read(&mut stderr)
        )
    });
    ToolOutput {
        status,
        stdout: rewind_read(&mut stdout),
        stderr: rewind_read(&mut stderr),
    }
}

/// Like [`run_tool`], but panics (with stdout and stderr) unless the tool exits successfully.
pub fn run_tool_ok(cmd: Command, timeout: Duration) -> ToolOutput {
    let description = format!("{cmd:?}");
    let output = run_tool(cmd, timeout);
    assert!(
        output.success(),
        "{description} failed with {}\nstderr:\n{}\nstdout:\n{}",
        output.status,
        output.stderr,
        output.stdout
    );
    output
}

fn rewind_read(file: &mut File) -> String {
    let mut bytes = Vec::new();
    file.rewind().expect("rewind");
    file.read_to_end(&mut bytes).expect("read tool output");
    String::from_utf8_lossy(&bytes).into_owned()
}
