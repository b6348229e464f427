#!/usr/bin/env python3
"""Counting TCP forwarder used by bench/run (not meant to be run by hand).

    forwarder.py LISTEN_PORT TARGET_PORT CONTROL_PORT

Listens on 127.0.0.1:LISTEN_PORT and relays every connection to 127.0.0.1:TARGET_PORT.
Counts bytes in both directions and the HTTP request lines going to the target (the caches
only send GET/HEAD requests upstream, so each header block is one request).
Connecting to 127.0.0.1:CONTROL_PORT returns one JSON snapshot of the counters.

The target->client direction (the big one) is relayed with os.splice (zero copy) so the
forwarder costs little CPU even at many GB/s; one thread per direction per connection.
Loopback only, by construction.
"""
import json
import os
import re
import socket
import sys
import threading

HOST = "127.0.0.1"
F_SETPIPE_SZ = 1031
CHUNK = 1 << 20
REQ_RE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")

lock = threading.Lock()
stats = {
    "bytes_down": 0,  # target -> client (what the cache downloaded)
    "bytes_up": 0,  # client -> target
    "connections": 0,
    "requests": 0,
    "by_kind": {},  # "GET blob" -> count
}


def kind_of(path):
    path = path.split("?", 1)[0]
    if path in ("/v2/", "/v2"):
        return "ping"
    if "/blobs/" in path:
        return "blob"
    if "/manifests/" in path:
        return "manifest"
    if "/tags/list" in path:
        return "tags"
    return "other"


def add(key, n):
    with lock:
        stats[key] += n


def count_request(method, path):
    k = f"{method} {kind_of(path)}"
    with lock:
        stats["requests"] += 1
        stats["by_kind"][k] = stats["by_kind"].get(k, 0) + 1


def close_both(a, b):
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def client_to_target(client, target):
    buf = b""
    try:
        while True:
            data = client.recv(CHUNK)
            if not data:
                try:
                    target.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                first = buf[: buf.find(b"\r\n")]
                m = REQ_RE.match(first)
                if m:
                    count_request(m.group(1).decode(), m.group(2).decode("latin-1"))
                buf = buf[end + 4 :]
            if len(buf) > (1 << 20):  # a body we cannot parse; stop counting it
                buf = b""
            target.sendall(data)
            add("bytes_up", len(data))
    except OSError:
        close_both(client, target)


def target_to_client(client, target):
    try:
        r, w = os.pipe()
    except OSError:
        close_both(client, target)
        return
    try:
        try:
            import fcntl

            fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass
        src, dst = target.fileno(), client.fileno()
        while True:
            n = os.splice(src, w, CHUNK)
            if n == 0:
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            left = n
            while left:
                m = os.splice(r, dst, left)
                if m == 0:
                    raise OSError("short splice")
                left -= m
            add("bytes_down", n)
    except OSError:
        close_both(client, target)
    finally:
        os.close(r)
        os.close(w)


def handle(client, target_port):
    try:
        target = socket.create_connection((HOST, target_port), timeout=10)
    except OSError:
        client.close()
        return
    target.settimeout(None)
    for s in (client, target):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    add("connections", 1)
    t = threading.Thread(target=client_to_target, args=(client, target), daemon=True)
    t.start()
    target_to_client(client, target)
    t.join()
    client.close()
    target.close()


def listener(port, backlog):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((HOST, port))
    ls.listen(backlog)
    return ls


def serve_control(port):
    ls = listener(port, 16)
    while True:
        c, _ = ls.accept()
        with lock:
            snap = json.dumps(stats)
        try:
            c.sendall(snap.encode())
        except OSError:
            pass
        c.close()


def main():
    listen_port, target_port, control_port = map(int, sys.argv[1:4])
    threading.Thread(target=serve_control, args=(control_port,), daemon=True).start()
    ls = listener(listen_port, 1024)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=handle, args=(c, target_port), daemon=True).start()


if __name__ == "__main__":
    main()
