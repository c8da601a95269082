"""The demo world's HTTP server: every fault as a crawler meets it, concurrency,
clients that hang up, and request counting."""

import io
import json
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from dalle_core.demo.server import serve_demo_world
from dalle_core.demo.world import DemoWorld

SLOW_DELAY_S = 1.0
CLIENT_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def world():
    return DemoWorld(seed=11, items_per_batch=120, n_batches=2, n_eval=16)


@pytest.fixture
def server(world):
    with serve_demo_world(world, slow_delay_s=SLOW_DELAY_S) as srv:
        yield srv


def first(world, fault):
    return next(i for i in world.all_items() if i.fault == fault)


def get(server, key, **kw):
    return requests.get(f"{server.url}/img/{key}", timeout=kw.pop("timeout", 5), **kw)


def test_health_and_unknown_paths(server):
    assert server.url == f"http://127.0.0.1:{server.port}"
    r = requests.get(f"{server.url}/health", timeout=5)
    assert r.status_code == 200 and json.loads(r.text)["status"] == "ok"
    assert get(server, "b009-000000").status_code == 404
    assert get(server, "not-a-key").status_code == 404
    assert requests.get(f"{server.url}/elsewhere", timeout=5).status_code == 404


def test_clean_item_and_counts(server, world):
    item = first(world, None)
    r = get(server, item.key)
    assert r.status_code == 200 and r.headers["Content-Type"] == item.content_type
    assert r.content == item.image_bytes()
    Image.open(io.BytesIO(r.content)).load()
    get(server, item.key + "?retry=1")  # a query string does not change the item
    assert server.request_counts[item.key] == 2
    assert sum(server.request_counts.values()) == 2


def test_http_errors(server, world):
    assert get(server, first(world, "http_404").key).status_code == 404
    key = first(world, "http_500").key
    assert [get(server, key).status_code for _ in range(3)] == [500, 500, 500]


def test_flaky_item_fails_only_its_first_request(world):
    item = first(world, "flaky_500")
    for _ in range(2):  # per server instance
        with serve_demo_world(world) as srv:
            assert get(srv, item.key).status_code == 500
            r = get(srv, item.key)
            assert r.status_code == 200 and r.content == item.image_bytes()
            assert get(srv, item.key).status_code == 200
            assert srv.request_counts[item.key] == 3


def test_slow_item_outlasts_the_client_timeout(server, world):
    item = first(world, "slow")
    start = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        get(server, item.key, timeout=CLIENT_TIMEOUT_S)
    assert time.monotonic() - start < SLOW_DELAY_S
    r = get(server, item.key, timeout=SLOW_DELAY_S + 5)  # a patient client gets the image
    assert r.status_code == 200 and r.elapsed.total_seconds() >= SLOW_DELAY_S * 0.9
    # the server is not blocked meanwhile
    assert get(server, first(world, None).key, timeout=CLIENT_TIMEOUT_S).status_code == 200


def test_broken_bodies(server, world):
    for fault in ("truncated", "corrupt"):
        item = first(world, fault)
        r = get(server, item.key)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("image/")
        with pytest.raises(Exception):
            with Image.open(io.BytesIO(r.content)) as im:
                im.load()
    truncated = first(world, "truncated")
    assert len(get(server, truncated.key).content) == len(truncated.image_bytes()) // 2
    r = get(server, first(world, "not_image").key)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")


def test_every_item_answers_as_the_world_says(server, world):
    for item in world.batch_items(0):
        if item.fault == "slow":
            continue
        want = item.response(0)
        r = get(server, item.key)
        assert (r.status_code, r.headers["Content-Type"], r.content) == (want.status, want.content_type, want.body)


def test_many_concurrent_clients(server, world):
    items = [i for i in world.all_items() if i.fault is None][:96]

    def fetch(item):
        with requests.Session() as s:
            return s.get(f"{server.url}/img/{item.key}", timeout=10)

    with ThreadPoolExecutor(max_workers=48) as pool:
        responses = list(pool.map(fetch, items))
    assert all(r.status_code == 200 for r in responses)
    assert all(r.content == i.image_bytes() for r, i in zip(responses, items))
    assert all(server.request_counts[i.key] == 1 for i in items)  # nothing fetched twice


def test_clients_that_hang_up_do_not_hurt_the_server(server, world, capfd):
    host, port = "127.0.0.1", server.port
    for item in (first(world, None), first(world, "slow"), first(world, "corrupt")):
        sock = socket.create_connection((host, port))
        sock.sendall(f"GET /img/{item.key} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        if item.fault != "slow":
            sock.recv(10)  # read a little of the response; the slow one has not started
        # hang up with a reset instead of a clean close
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    time.sleep(SLOW_DELAY_S + 0.3)  # the slow response is written to a closed socket
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    assert get(server, first(world, None).key).status_code == 200
    assert "Traceback" not in capfd.readouterr().err


def test_stop_frees_the_port(world):
    srv = serve_demo_world(world)
    assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200
    srv.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{srv.url}/health", timeout=2)


class _SlowToBuildWorld(DemoWorld):
    """The demo world on a slow machine: building a batch's items takes 0.5 s."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.builds = 0

    def _make_batch(self, batch):
        self.builds += 1
        time.sleep(0.5)
        return super()._make_batch(batch)


def test_a_crawls_first_requests_do_not_wait_for_the_world_to_be_built():
    # The first requests of a crawl used to build the batch each, inside the
    # request: on a slow machine they outlasted the crawler's timeout and
    # ordinary items were dropped (the crawl depended on the machine's speed).
    world = _SlowToBuildWorld(seed=11, items_per_batch=120, n_batches=2, n_eval=16)
    with serve_demo_world(world, slow_delay_s=SLOW_DELAY_S) as srv:
        items = [i for i in world.batch_items(1) if i.fault is None][:16]

        def fetch(item):
            with requests.Session() as s:
                return s.get(f"{srv.url}/img/{item.key}", timeout=CLIENT_TIMEOUT_S)

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(fetch, items))
    assert [r.status_code for r in responses] == [200] * 16
    assert world.builds == 2  # each batch once


def test_a_batch_is_built_once_however_many_threads_ask():
    world = _SlowToBuildWorld(seed=11, items_per_batch=120, n_batches=2, n_eval=16)
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: world.batch_items(0), range(8)))
    assert world.builds == 1
    assert all(b is batches[0] for b in batches)
