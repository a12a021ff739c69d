"""What a user sees when object storage fails: a missing bucket, missing credentials, permission denied,
throttling and a connection dropped mid-upload. A loopback proxy in front of moto's S3 server makes the faults,
so the product's own retry code (botocore's standard mode) meets real HTTP responses."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from helpers import cache_args

from pipeline import cli
from storage.remote import fs as remote

FAULTS = {"SlowDown": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")}


class FaultyProxy(ThreadingHTTPServer):
    """Forwards every request to the S3 endpoint, except that the next ``throttle`` PUTs get a 503 SlowDown and
    the next ``drop`` PUTs lose their connection after the request body was read."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlparse(upstream)
        self.throttle = self.drop = 0
        self.faults = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def take(self, method: str) -> str | None:
        with self.lock:
            if method == "PUT" and self.throttle:
                self.throttle -= 1
                self.faults += 1
                return "throttle"
            if method == "PUT" and self.drop:
                self.drop -= 1
                self.faults += 1
                return "drop"
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        """The request body as sent; a chunked one (botocore's streamed checksums) keeps its framing."""
        if "chunked" not in self.headers.get("Transfer-Encoding", ""):
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw = b""
        while True:
            line = self.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            raw += self.rfile.read(size + 2)
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
            raw += line
        return raw + b"\r\n"

    def _forward(self):
        body = self._body()
        fault = self.server.take(self.command)
        if fault == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "throttle":
            status, text = FAULTS["SlowDown"]
            self.send_response(status)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port)
        upstream.request(self.command, self.path, body, {k: v for k, v in self.headers.items() if k != "Host"})
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        length = answer.getheader("Content-Length") if self.command == "HEAD" else None  # HEAD: the object's
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    from s3fs import S3FileSystem

    server = FaultyProxy(s3_endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    S3FileSystem.clear_instance_cache()  # a cached filesystem would keep the old endpoint
    yield server
    server.shutdown()
    S3FileSystem.clear_instance_cache()


def _one_line_error(capsys, argv) -> str:
    assert cli.main(["-q", *map(str, argv)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_throttling_and_a_dropped_upload_are_retried(proxy, bucket, tmp_path):
    local = tmp_path / "shard.arrow"
    local.write_bytes(os.urandom(5000))
    proxy.throttle, proxy.drop = 1, 1
    remote.upload_file(local, f"{bucket}/a/shard.arrow")
    assert proxy.faults == 2 and remote.read_bytes(f"{bucket}/a/shard.arrow") == local.read_bytes()


def test_throttling_that_does_not_stop_fails_naming_the_url_and_nothing_is_complete(
        proxy, bucket, llama_dir, corpus_jsonl, tmp_path, capsys):
    proxy.throttle = 10**6
    url = f"{bucket}/cache"
    line = _one_line_error(capsys, ["cache", *cache_args(llama_dir, corpus_jsonl, url, **{"cache.local_dir": tmp_path})])
    assert url in line and ("SlowDown" in line or "reduce your request rate" in line), line
    proxy.throttle = 0
    assert not remote.exists(f"{url}/manifest.json")


def test_a_missing_bucket_is_named(s3_endpoint, llama_dir, corpus_jsonl, tmp_path, capsys):
    url = "s3://no-such-bucket-distillery/cache"
    line = _one_line_error(capsys, ["cache", *cache_args(llama_dir, corpus_jsonl, url, **{"cache.local_dir": tmp_path})])
    assert "s3://no-such-bucket-distillery/cache" in line and "bucket does not exist" in line, line
    line = _one_line_error(capsys, ["verify", url])
    assert url in line and "does not exist" in line, line


def test_missing_credentials_are_named(s3_endpoint, bucket, monkeypatch, capsys):
    from s3fs import S3FileSystem

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    S3FileSystem.clear_instance_cache()
    try:
        line = _one_line_error(capsys, ["verify", f"{bucket}/cache"])
    finally:
        S3FileSystem.clear_instance_cache()
    assert f"{bucket}/cache" in line and "credentials" in line.lower(), line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_permission_denied_is_named(s3_endpoint, monkeypatch, capsys):
    """A second moto server with authentication on: the dummy keys belong to no user, so every call is denied."""
    from s3fs import S3FileSystem

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        S3FileSystem.clear_instance_cache()
        line = _one_line_error(capsys, ["verify", "s3://private-bucket/cache"])
    finally:
        server.terminate()
        server.wait()
        S3FileSystem.clear_instance_cache()
    assert "s3://private-bucket/cache" in line and any(w in line for w in ("Forbidden", "denied", "AccessKey")), line
