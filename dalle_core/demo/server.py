"""The demo world served over HTTP on loopback, with the faults of a real crawl.

`GET /img/<key>` answers as the world's item says (404s, 500s, a first-request
500, a response slower than the crawler's timeout, truncated or garbage bytes,
HTML instead of an image); `GET /health` answers "ok". One thread per
connection, so slow items do not hold up the rest of a concurrent crawl.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from .items import HttpResponse
from .world import DemoWorld

# what a client hanging up mid-response looks like from the server's side
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # never wait for handler threads (a slow item, an idle keep-alive)
    request_queue_size = 128  # many crawler workers connect at once

    def __init__(self, address, world: DemoWorld, slow_delay_s: float):
        self.world, self.slow_delay_s = world, slow_delay_s
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # A crawler that times out and hangs up is part of the game; anything
        # else is a bug worth the traceback.
        if not isinstance(sys.exc_info()[1], _DISCONNECTS):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as crawlers' connection pools expect
    timeout = 30  # seconds an idle keep-alive connection may hold its thread
    # headers and body go out in two writes; without TCP_NODELAY a reused
    # connection waits ~40 ms on every reply (Nagle + delayed ACK)
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format, *args):  # one line per request would drown a crawl's output
        pass

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            body = json.dumps({"status": "ok", "items": self.server.world.n_batches
                               * self.server.world.items_per_batch}).encode()
            return self._send(HttpResponse(200, "application/json", body))
        if not path.startswith("/img/"):
            return self._send(HttpResponse(404, "text/plain; charset=utf-8", b"no such page\n"))
        key = path[len("/img/"):]
        try:
            item = self.server.world.item(key)
        except KeyError:
            return self._send(HttpResponse(404, "text/plain; charset=utf-8", b"no such image\n"))
        with self.server.lock:
            attempt = self.server.counts[key]
            self.server.counts[key] += 1
        self._send(item.response(attempt, slow_delay_s=self.server.slow_delay_s))

    def _send(self, response: HttpResponse) -> None:
        if response.delay_s > 0 and self.server.stopping.wait(response.delay_s):
            return  # the server is shutting down
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
        except _DISCONNECTS:
            self.close_connection = True


class DemoWorldServer:
    """A running server; stop it with `.stop()` or use it as a context manager."""

    def __init__(self, server: _Server, thread: threading.Thread):
        self._server, self._thread = server, thread
        self.host, self.port = server.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"

    @property
    def request_counts(self) -> Counter:
        """Requests received so far per item key (a snapshot)."""
        with self._server.lock:
            return Counter(self._server.counts)

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "DemoWorldServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_demo_world(world: DemoWorld, host: str = "127.0.0.1", port: int = 0,
                     slow_delay_s: float = 3.0) -> DemoWorldServer:
    """Start serving `world` in a daemon thread; port 0 picks a free port.

    `slow_delay_s` is how long "slow" items wait before answering: set it above
    the crawler's timeout.
    """
    # Build the world's items before the first request, not during it: the
    # first ~16 requests of a crawl used to each build the 1,500-item batch
    # under the GIL, and on a slow or busy machine that outlasted the crawler's
    # timeout three times, so ordinary items were dropped as "timeout" and the
    # crawl's output depended on the machine's speed.
    world.build()
    server = _Server((host, port), world, slow_delay_s)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"demo-world-server-{server.server_address[1]}", daemon=True)
    thread.start()
    return DemoWorldServer(server, thread)
