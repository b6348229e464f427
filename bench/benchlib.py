"""Helpers shared by bench/run (the benchmark) and bench/soak (the soak run); not run by itself.

Processes: every process started with `spawn` runs in its own session with its log in the work
dir and is killed on exit (`start_work` registers the atexit and signal handlers; SIGSTOPped
pids in STOPPED are SIGCONTed first). Registry client: blob and manifest pushes over the
registry HTTP API and streaming sha256 verification. Sampling: peak RSS, threads and open fds
of the processes under test, from /proc. Loopback (127.0.0.1) only, standard library only.
"""
import atexit
import concurrent.futures
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
MiB = 1 << 20
GiB = 1 << 30
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
T0 = time.monotonic()

# ----------------------------------------------------------------------------- processes

PROCS = []  # (name, Popen)
STOPPED = set()  # pids we SIGSTOPped
WORK = None
KEEP = False


def start_work(prefix, parent=None, keep=False):
    """Creates the temp work dir (logs, storage) and makes sure every process started with
    `spawn` is stopped however the script ends; returns the dir."""
    global WORK, KEEP
    WORK = tempfile.mkdtemp(prefix=prefix, dir=parent)
    KEEP = keep
    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    return WORK


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def spawn(name, argv, env=None):
    out = open(os.path.join(WORK, f"{name}.log"), "ab")  # a restarted process appends
    p = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )
    out.close()
    PROCS.append((name, p))
    return p


def cleanup():
    for pid in list(STOPPED):
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
    for _, p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + 5
    for _, p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    if WORK and not KEEP:
        shutil.rmtree(WORK, ignore_errors=True)
    elif WORK:
        print(f"work dir kept: {WORK}", file=sys.stderr)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(port, path="/v2/", timeout=30, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status < 500:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path} within {timeout}s")


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def registry_config(path, port, storage, remote=None):
    text = f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {HOST}:{port}
  secret: kura-bench-secret
"""
    if remote:
        text += f"proxy:\n  remoteurl: {remote}\n"
    with open(path, "w") as f:
        f.write(text)


def build(no_build, binary=None):
    """Builds Kura in release mode (unless `no_build` or a ready `binary` is given) and returns
    the path of a private copy, so a concurrent rebuild cannot swap the binary mid-run."""
    if binary is None and not no_build:
        for attempt in range(1, 21):
            log(f"cargo build --release (attempt {attempt})")
            p = subprocess.run(["cargo", "build", "--release"], cwd=ROOT, capture_output=True, text=True)
            if p.returncode == 0:
                break
            log("build failed (others may be mid-edit); retrying in 30 s:\n" + p.stderr[-1500:])
            time.sleep(30)
        else:
            raise SystemExit("cargo build --release kept failing")
    src = binary or os.path.join(ROOT, "target", "release", "kura")
    dst = os.path.join(WORK, "kura-bin")
    shutil.copy2(src, dst)
    return dst


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty(src)" if dirty else "")
    except OSError:
        return None


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- sampling

def proc_status(pid):
    """VmRSS, VmHWM, RssAnon (bytes) and Threads of a process; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon"):
                    out[k] = int(v.split()[0]) * 1024
                elif k == "Threads":
                    out[k] = int(v)
    except OSError:
        pass
    return out


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Peaks:
    """Peak RSS, threads and open fds per (process, phase), sampled every `interval` seconds;
    the RSS peak also takes VmHWM, reset with clear_refs=5 at the phase start, so a spike
    between two samples still counts."""

    FIGURES = ("rss", "threads", "fds")

    def __init__(self, pids, interval=0.05):
        self.pids = dict(pids)  # name -> pid
        self.interval = interval
        self.phase = None
        self.peaks = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def set_pid(self, name, pid):
        """The process was restarted: keep the peaks so far, sample the new pid from now on."""
        with self.lock:
            self.pids[name] = pid

    def _sample(self):
        while not self.stop.wait(self.interval):
            with self.lock:
                phase, pids = self.phase, dict(self.pids)
            if phase is None:
                continue
            for name, pid in pids.items():
                st = proc_status(pid)
                self._note(name, phase, st.get("VmRSS", 0), st.get("Threads", 0), open_fds(pid))

    def _note(self, name, phase, rss, threads, fds):
        with self.lock:
            peak = self.peaks.setdefault((name, phase), dict.fromkeys(self.FIGURES, 0))
            for k, v in zip(self.FIGURES, (rss, threads, fds)):
                peak[k] = max(peak[k], v)

    def begin(self, phase):
        with self.lock:
            pids = list(self.pids.values())
        for pid in pids:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        with self.lock:
            self.phase = phase

    def note_hwm(self):
        """Takes each process's VmHWM into the current phase's peak (call before killing one)."""
        with self.lock:
            phase, pids = self.phase, dict(self.pids)
        if phase is not None:
            for name, pid in pids.items():
                self._note(name, phase, proc_status(pid).get("VmHWM", 0), 0, 0)

    def end(self):
        """Ends the phase; returns {name: {"rss": bytes, "threads": n, "fds": n}}."""
        self.note_hwm()
        with self.lock:
            phase, self.phase = self.phase, None
            return {name: self.peaks.pop((name, phase), dict.fromkeys(self.FIGURES, 0)) for name in self.pids}

    def end_rss(self):
        """Ends the phase; returns {name: peak RSS bytes}."""
        return {name: v["rss"] for name, v in self.end().items()}


# ----------------------------------------------------------------------------- registry client

def conn(port, timeout=120):
    return http.client.HTTPConnection(HOST, port, timeout=timeout)


def sha256_hex(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(n):
    buf = bytearray(n)
    step = 16 * MiB
    for i in range(0, n, step):
        k = min(step, n - i)
        buf[i : i + k] = os.urandom(k)
    return buf


RETRY_AFTER_CAP_S = 5.0  # a longer Retry-After is waited as this


def get_retrying(c, path, headers=None, retries=5, on_retry=None):
    """GET on connection `c`; a 503 carrying Retry-After (Kura's answer when its download
    admission is full) is retried after that many seconds (capped), at most `retries` times.
    Returns the last response, body unread; `on_retry()` is called once per retried answer."""
    attempt = 0
    while True:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        wait = r.getheader("Retry-After")
        if r.status != 503 or wait is None or attempt >= retries:
            return r
        attempt += 1
        r.read()
        if on_retry:
            on_retry()
        try:
            seconds = float(wait)
        except ValueError:  # an HTTP date: not what Kura sends; wait one second
            seconds = 1.0
        time.sleep(min(max(seconds, 0.05), RETRY_AFTER_CAP_S))


def push_blob(port, repo, data, digest):
    c = conn(port, timeout=300)
    c.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    r = c.getresponse()
    r.read()
    if r.status != 202:
        raise RuntimeError(f"upload start for {repo}: {r.status}")
    loc = urllib.parse.urlsplit(r.getheader("Location"))
    path = loc.path + ("?" + loc.query if loc.query else "")
    path += ("&" if "?" in path else "?") + "digest=" + urllib.parse.quote(digest)
    c.request("PUT", path, body=data,
              headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    r = c.getresponse()
    r.read()
    c.close()
    if r.status != 201:
        raise RuntimeError(f"upload of {digest} to {repo}: {r.status}")


def push_manifest(port, repo, tag, body, media_type):
    c = conn(port)
    c.request("PUT", f"/v2/{repo}/manifests/{tag}", body=body, headers={"Content-Type": media_type})
    r = c.getresponse()
    text = r.read()
    c.close()
    if r.status != 201:
        raise RuntimeError(f"manifest PUT {repo}:{tag}: {r.status} {text[:300]!r}")


def seed_image(port, repo, layer_sizes, label, tag="v1"):
    """Pushes one layer of random bytes per size, a config and an OCI manifest under `tag`;
    returns its description ("layers": the layer descriptors, "big": the last layer's digest)."""
    layers = []
    for size in layer_sizes:
        data = random_bytes(size)
        d = sha256_hex(data)
        push_blob(port, repo, data, d)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size})
        del data
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Labels": {"kura-bench": label}},
        "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]},
    }).encode()
    cd = sha256_hex(config)
    push_blob(port, repo, config, cd)
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                           "layers": layers}).encode()
    md = sha256_hex(manifest)
    push_manifest(port, repo, tag, manifest, OCI_MANIFEST)
    total = len(manifest) + len(config) + sum(l["size"] for l in layers)
    return {"repo": repo, "tag": tag, "digest": md, "size": total, "blobs": [config_desc] + layers,
            "big": layers[-1]["digest"], "big_size": layers[-1]["size"]}


def seed_blob(port, repo, size):
    data = random_bytes(size)
    d = sha256_hex(data)
    push_blob(port, repo, data, d)
    return d


def seed_blobs(port, repo, sizes, workers=4):
    """Pushes one blob of random bytes per size, `workers` at a time; returns [(digest, size)]."""
    def one(size):
        data = random_bytes(size)
        digest = sha256_hex(data)
        push_blob(port, repo, data, digest)
        return digest, size

    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, sizes))


def at_once(n, fn, cap, stack_kib=256):
    """Runs fn(i) for i in range(n) on n threads released together (small stacks, so a
    thousand cost little) and waits for them at most `cap` s; fn handles its own errors.
    Returns (seconds from the release until the last one finished, how many still ran at the cap)."""
    gate = threading.Barrier(n + 1, timeout=120)
    ends = [None] * n

    def run(i):
        gate.wait()
        try:
            fn(i)
        finally:
            ends[i] = time.monotonic()

    threading.stack_size(stack_kib * 1024)
    try:
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
    finally:
        threading.stack_size(0)
    gate.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(max(0.1, t0 + cap - time.monotonic()))
    done = [e for e in ends if e is not None]
    return (max(done) - t0 if done else None), sum(1 for t in threads if t.is_alive())


def read_verify(resp, digest, size):
    """Streams a response body through sha256; returns an error string or None."""
    h = hashlib.sha256()
    buf = bytearray(MiB)
    mv = memoryview(buf)
    n = 0
    while True:
        k = resp.readinto(mv)
        if not k:
            break
        h.update(mv[:k])
        n += k
    if size is not None and n != size:
        return f"size {n} != {size}"
    if "sha256:" + h.hexdigest() != digest:
        return "sha256 mismatch"
    return None
