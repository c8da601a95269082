"""The storage resource against a local directory and a real S3-protocol server."""

import pytest

from dalle_core.storage import LocalStorage, S3Storage, StorageError, open_storage


def _exercise(store):
    store.put_bytes("a/b/one.bin", b"\x00\x01")
    store.put_text("a/two.txt", "héllo")
    assert store.exists("a/b/one.bin") and not store.exists("a/missing")
    assert store.get_bytes("a/b/one.bin") == b"\x00\x01"
    assert store.get_text("a/two.txt") == "héllo"
    assert store.list("a/") == ["a/b/one.bin", "a/two.txt"]
    assert store.list("zzz/") == []
    with store.local_copy("a/two.txt") as p:
        assert p.read_text(encoding="utf-8") == "héllo"
    with pytest.raises(FileNotFoundError, match="a/missing"):
        store.get_bytes("a/missing")
    store.delete("a/two.txt")
    assert store.list("a/") == ["a/b/one.bin"]


def test_local_storage_round_trip(tmp_path):
    store = LocalStorage(tmp_path / "root")
    _exercise(store)
    assert store.uri("a/b/one.bin") == str(tmp_path / "root" / "a" / "b" / "one.bin")


def test_local_storage_refuses_keys_outside_root(tmp_path):
    with pytest.raises(StorageError, match="escapes"):
        LocalStorage(tmp_path).put_bytes("../evil", b"x")


def test_s3_storage_round_trip_on_real_server(s3_endpoint, s3_bucket, tmp_path):
    store = open_storage(f"s3://{s3_bucket}/runs/x", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Storage)
    _exercise(store)
    assert store.uri("a/b/one.bin") == f"s3://{s3_bucket}/runs/x/a/b/one.bin"
    src = tmp_path / "big.bin"
    src.write_bytes(b"z" * 300_000)
    store.put_file("files/big.bin", src)
    assert store.get_file("files/big.bin", tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_bucket_name_too_short_names_the_setting():
    with pytest.raises(StorageError, match="too short"):
        S3Storage("ab")


class _FlakyProxy:
    """An HTTP proxy in front of the S3 server that answers the first requests
    with 503 SlowDown (throttling) and drops the next connection without a reply,
    then forwards everything: what S3 does to a busy crawler."""

    def __init__(self, upstream: str, throttle: int = 2, drop: int = 1):
        import http.server
        import threading
        import urllib.parse

        self.plan = ["throttle"] * throttle + ["drop"] * drop
        self.seen: list[str] = []
        up = urllib.parse.urlparse(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy.plan.pop(0) if proxy.plan else "forward"
                proxy.seen.append(action)
                if action == "throttle":
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_s3_throttling_and_dropped_connections_are_retried(s3_endpoint, s3_bucket):
    proxy = _FlakyProxy(s3_endpoint, throttle=2, drop=1)
    try:
        store = open_storage(f"s3://{s3_bucket}/flaky", endpoint_url=proxy.url)
        store.put_bytes("shard-000.tar", b"payload" * 100)  # 503, 503, dropped, then stored
        assert proxy.seen[:3] == ["throttle", "throttle", "drop"] and "forward" in proxy.seen
        assert store.get_bytes("shard-000.tar") == b"payload" * 100
        # beyond the retry budget the error surfaces, naming the key (not a silent loss)
        proxy.plan = ["throttle"] * 20
        few = S3Storage(s3_bucket, "flaky", endpoint_url=proxy.url, max_attempts=2)
        with pytest.raises(Exception, match="SlowDown|reduce your request rate|503"):
            few.put_bytes("shard-001.tar", b"x")
    finally:
        proxy.close()
