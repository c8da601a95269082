"""The crawler cannot be turned against its own cluster, and cannot be made to decode a pixel bomb.

The address rule is tested on addresses alone (a table) and with DNS mocked by
an injected resolver; the refusal path end to end against loopback servers
under a production profile (allow_private_addresses False). No test here opens
a connection to anything but 127.0.0.1: every socket connect is checked.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import zlib
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from PIL import Image

from dalle_core.data.crawl import FAILURE_REASONS, crawl, is_failure_reason
from dalle_core.data.fetch import make_session
from dalle_core.data.image_decode import ImageDecodeError, load_rgb, process_image
from dalle_core.data.net_guard import AddressPolicy, BlockedAddressError, blocked_reason, system_resolver
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

from test_crawl import read_part_outputs

PAPER = get_profile("paper-1.3B").data
# the paper profile's address and pixel rules, at a size and speed the tests can afford
PROD = replace(PAPER, image_size=32, image_format="png", crawl_workers=4, crawl_part_size=50,
               crawl_timeout_s=2.0, crawl_retries=1, crawl_backoff_s=0.01)
TINY = get_profile("tiny").data


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connect to a non-loopback address fails the test (and never leaves the machine)."""
    real = socket.socket.connect
    attempts = []

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        attempts.append(host)
        assert "loopback" in (blocked_reason(host) or ""), f"a test tried to connect to {address!r}"
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


# --------------------------------------------------------------------------- the rule, on addresses alone

VERDICTS = [
    # public
    ("8.8.8.8", None),
    ("93.184.215.14", None),
    ("2606:4700:4700::1111", None),
    ("::ffff:8.8.8.8", None),  # IPv4-mapped public
    ("64:ff9b::808:808", None),  # NAT64 of a public address
    ("2002:808:808::1", None),  # 6to4 of a public address
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # AWS / GCP / Azure instance metadata
    ("100.64.0.1", "CGNAT"),
    ("100.100.100.200", "metadata"),  # Alibaba Cloud metadata, inside 100.64/10
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "private"),  # "this network"
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "private"),  # documentation
    ("198.18.0.1", "private"),  # benchmarking
    ("192.0.0.8", "private"),  # IETF protocol assignments
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fd00::1", "unique local"),
    ("fc12:3456::1", "unique local"),
    ("fd00:ec2::254", "metadata"),  # AWS IMDS over IPv6
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("2001:db8::1", "private"),  # documentation
    ("100::1", "private"),  # discard-only
    # IPv6 forms that carry an IPv4 address: judged by where they lead
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1: loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254: link-local"),
    ("::ffff:10.1.2.3", "IPv4-mapped 10.1.2.3: private"),
    ("::ffff:100.64.1.1", "CGNAT"),
    ("64:ff9b::a9fe:a9fe", "NAT64 169.254.169.254: link-local"),
    ("64:ff9b::7f00:1", "NAT64 127.0.0.1: loopback"),
    ("64:ff9b:1::a00:1", "local-use NAT64"),
    ("2002:a00:1::1", "6to4 10.0.0.1: private"),
    ("2002:7f00:1::1", "6to4 127.0.0.1: loopback"),
    ("::10.0.0.1", "IPv4-compatible 10.0.0.1: private"),
    ("::127.0.0.1", "IPv4-compatible 127.0.0.1: loopback"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("[::1]", "loopback"),  # as it appears in a URL
]


@pytest.mark.parametrize("address, expected", VERDICTS)
def test_address_rule_table(address, expected):
    reason = blocked_reason(address)
    if expected is None:
        assert reason is None, (address, reason)
    else:
        assert reason and expected in reason, (address, reason)


def test_demo_profiles_allow_loopback_and_private_but_never_metadata():
    demo = AddressPolicy(allow_private=True)
    for address in ("127.0.0.1", "::1", "10.0.0.1", "192.168.0.7", "100.64.0.1", "fd00::1", "8.8.8.8"):
        assert demo.verdict(address) is None, address
    for address in ("169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "fd00:ec2::254",
                    "100.100.100.200", "0.0.0.0", "::"):
        assert demo.verdict(address), address
    # the profiles: tiny and small are the demo's, the paper's are production
    assert get_profile("tiny").data.allow_private_addresses and get_profile("small").data.allow_private_addresses
    for name in ("paper-1.3B", "paper-12B"):
        data = get_profile(name).data
        assert not data.allow_private_addresses
        assert data.max_image_pixels <= 4096 * 4096 < Image.MAX_IMAGE_PIXELS
    assert get_profile("tiny").data.max_image_pixels <= get_profile("paper-1.3B").data.max_image_pixels
    assert {"blocked_address", "too_many_pixels"} <= set(FAILURE_REASONS)


def test_every_resolved_address_is_checked():
    """DNS is mocked: one bad record among good ones refuses the host (resolvers rotate records)."""
    records = {
        "img.example": ["93.184.215.14", "2606:4700::1"],
        "mixed.example": ["93.184.215.14", "10.0.0.5"],
        "rebind.example": ["127.0.0.1"],
        "meta.example": ["::ffff:169.254.169.254"],
        "nothing.example": [],
    }
    policy = AddressPolicy(resolver=lambda host, port: records[host])
    assert policy.resolve_checked("img.example", 443) == ["93.184.215.14", "2606:4700::1"]
    with pytest.raises(BlockedAddressError, match=r"mixed\.example resolves to 10\.0\.0\.5: private") as e:
        policy.resolve_checked("mixed.example", 80)
    assert (e.value.host, e.value.address) == ("mixed.example", "10.0.0.5")
    with pytest.raises(BlockedAddressError, match="loopback"):
        policy.resolve_checked("rebind.example", 80)
    with pytest.raises(BlockedAddressError, match="link-local"):
        policy.resolve_checked("meta.example", 80)
    with pytest.raises(socket.gaierror):
        policy.resolve_checked("nothing.example", 80)
    # the same names under the demo rule
    demo = AddressPolicy(allow_private=True, resolver=policy.resolver)
    assert demo.resolve_checked("mixed.example", 80) == ["93.184.215.14", "10.0.0.5"]
    with pytest.raises(BlockedAddressError):
        demo.resolve_checked("meta.example", 80)


def test_odd_spellings_of_loopback_resolve_to_loopback():
    """The check is on what the resolver returns, so decimal / hex spellings cannot slip past it."""
    for spelling in ("2130706433", "0x7f000001", "127.1", "localhost"):
        addresses = system_resolver(spelling, 80)
        assert addresses and all(blocked_reason(a) == "loopback" for a in addresses), (spelling, addresses)
        with pytest.raises(BlockedAddressError, match="loopback"):
            AddressPolicy().resolve_checked(spelling, 80)


# --------------------------------------------------------------------------- end to end, on loopback


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: Counter = Counter()
    hosts: list = []
    redirects: dict = {}  # path -> Location
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        with self.lock:
            self.requests[(port, self.path)] += 1
            self.hosts.append(self.headers.get("Host"))
        location = self.redirects.get((port, self.path))
        if location is not None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, "PNG")
        body = buf.getvalue()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


@pytest.fixture
def servers():
    """Two loopback servers: `public` (its port counts as a public address in the tests that say so)
    and `inside` (stands for a service of the cluster)."""
    Handler.requests, Handler.hosts, Handler.redirects = Counter(), [], {}
    out = []
    for _ in range(2):
        srv = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        out.append(srv)
    yield out[0].server_address[1], out[1].server_address[1]
    for srv in out:
        srv.shutdown()
        srv.server_close()


def _url_list(tmp_path, urls, name="l.csv"):
    pd.DataFrame({"url": urls, "caption": [f"row {i}" for i in range(len(urls))]}).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_production_profile_refuses_every_non_public_target(tmp_path, servers, loopback_only):
    """Under the paper profile a URL list pointing at the cluster (loopback, the metadata service,
    private networks, odd spellings) fetches nothing: every row fails with blocked_address."""
    _, inside = servers
    urls = [
        f"http://127.0.0.1:{inside}/secret",
        f"http://localhost:{inside}/secret",
        f"http://2130706433:{inside}/secret",  # 127.0.0.1 spelled as one number
        f"http://[::1]:{inside}/secret",
        f"http://[::ffff:127.0.0.1]:{inside}/secret",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.0.0.1/internal.png",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "https://0.0.0.0/x.png",
    ]
    storage = LocalStorage(tmp_path / "store")
    result = crawl(_url_list(tmp_path, urls), storage, "raw", PROD)
    assert not PROD.allow_private_addresses
    assert result.n_ok == 0 and result.n_failed == len(urls)
    assert result.failures_by_reason == {"blocked_address": len(urls)}
    ok, failed = read_part_outputs(storage, "raw")
    assert not ok
    for row, url in enumerate(urls):
        rec = failed[row]
        assert rec["url"] == url and rec["reason"] == "blocked_address" and is_failure_reason(rec["reason"])
        assert "not a public address" in rec["detail"] and rec["attempts"] == 1  # never retried
    assert "169.254.169.254: link-local" in failed[5]["detail"]
    assert "resolves to 127.0.0.1: loopback" in failed[1]["detail"]
    assert sum(Handler.requests.values()) == 0, "a blocked target was fetched"
    assert loopback_only == [], "a socket was opened to a blocked address"
    # the same list under the demo profile reaches the loopback server (and still not the metadata service)
    demo_urls = urls[:3] + urls[4:5]  # not [::1]: the server listens on IPv4 only
    result = crawl(_url_list(tmp_path, demo_urls, "demo.csv"), storage, "demo", replace(TINY, crawl_timeout_s=2.0))
    assert result.n_ok == 4 and Handler.requests[(inside, "/secret")] == 4


def _public_port_policy(public_port: int, resolver=None) -> AddressPolicy:
    """The production rule, except that 127.0.0.1 on `public_port` counts as a public address."""
    def rule(ip, port):
        return None if port == public_port and str(ip) == "127.0.0.1" else blocked_reason(ip)

    return AddressPolicy(rule=rule, resolver=resolver or system_resolver)


def test_redirects_are_checked_at_every_hop(tmp_path, servers, loopback_only):
    public, inside = servers
    base = f"http://127.0.0.1:{public}"
    Handler.redirects = {
        (public, "/to-inside"): f"http://127.0.0.1:{inside}/secret",
        (public, "/to-metadata"): "http://169.254.169.254/latest/meta-data/",
        (public, "/hop1"): f"{base}/hop2",  # allowed, allowed, then blocked at the third hop
        (public, "/hop2"): f"{base}/to-inside",
        (public, "/to-public"): "/ok",  # relative Location, same allowed server
        (public, "/loop"): "/loop",
        (public, "/to-file"): "file:///etc/passwd",
    }
    urls = [f"{base}/{p}" for p in ("to-inside", "to-metadata", "hop1", "to-public", "loop", "to-file", "ok")]
    storage = LocalStorage(tmp_path / "store")
    result = crawl(_url_list(tmp_path, urls), storage, "raw", PROD, address_policy=_public_port_policy(public))
    ok, failed = read_part_outputs(storage, "raw")
    assert sorted(ok) == [3, 6]  # the redirect to the same public server, and the plain image
    assert failed[0]["reason"] == "blocked_address" and f"redirect 1 to http://127.0.0.1:{inside}/secret" in failed[0]["detail"]
    assert failed[1]["reason"] == "blocked_address" and "169.254.169.254" in failed[1]["detail"]
    assert failed[2]["reason"] == "blocked_address" and "redirect 3 to" in failed[2]["detail"]
    assert failed[4]["reason"] == "connection_error" and "redirects" in failed[4]["detail"]
    assert failed[5]["reason"] == "invalid_url"
    assert Handler.requests[(public, "/loop")] == 6  # the first request and MAX_REDIRECTS hops
    assert not [k for k in Handler.requests if k[0] == inside], "a redirect reached the inside server"
    assert loopback_only and set(loopback_only) == {"127.0.0.1"}
    assert result.failures_by_reason["blocked_address"] == 3


def test_connection_is_pinned_to_the_checked_address_with_the_host_header_kept(servers):
    """A name the real DNS does not know (.test is reserved) is fetched through the injected resolver:
    so the connection goes to the address that was checked, with no second lookup (no DNS rebinding
    window), while the Host header still carries the name."""
    public, inside = servers
    calls = []

    def resolver(host, port):
        calls.append((host, port))
        return {"images.test": ["127.0.0.1"]}[host]

    session = make_session(2, _public_port_policy(public, resolver))
    with session:
        r = session.get(f"http://images.test:{public}/a.png", timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
        assert Handler.hosts[-1] == f"images.test:{public}"
        assert calls == [("images.test", public)]
        # the same name on the other port is the inside server: refused before connecting
        with pytest.raises(BlockedAddressError, match="images.test resolves to 127.0.0.1: loopback"):
            session.get(f"http://images.test:{inside}/secret", timeout=5)
        # a proxy cannot be used to get around the check
        with pytest.raises(BlockedAddressError, match="proxy"):
            session.get(f"http://images.test:{public}/a.png", timeout=5,
                        proxies={"http": f"http://127.0.0.1:{inside}"})
    assert not [k for k in Handler.requests if k[0] == inside]
    assert session.trust_env is False  # HTTP(S)_PROXY from the environment is ignored


# --------------------------------------------------------------------------- pixel bombs


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, followed by one short row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_decode(monkeypatch):
    """Pillow's decoding must not run: any ImageFile.load() fails the test."""
    from PIL import ImageFile

    def load(self):
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("width, height", [(20000, 20000), (8000, 8000), (4097, 4096), (100000, 200)])
def test_pixel_bombs_are_refused_from_the_header_without_decoding(width, height, no_decode):
    data = png_header(width, height)
    assert len(data) < 200
    with pytest.raises(ImageDecodeError) as e:
        process_image(data, 32, "png", max_pixels=PAPER.max_image_pixels)
    assert e.value.reason == "too_many_pixels" and "not decoded" in e.value.detail
    assert f"{width}x{height}" in e.value.detail or "decompression bomb" in e.value.detail.lower()


def test_pixel_bound_is_inclusive_and_formats_are_web_images(tmp_path):
    side = 64
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(buf, "PNG")
    out, w, h = process_image(buf.getvalue(), 16, "png", max_pixels=side * side)
    assert (w, h) == (side, side)
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        process_image(buf.getvalue(), 16, "png", max_pixels=side * side - 1)
    # formats outside the web's (here: PPM) are not opened by the crawler
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, "PPM")
    with pytest.raises(ImageDecodeError) as e:
        process_image(ppm.getvalue(), 16, "png")
    assert e.value.reason == "decode_error"
    assert load_rgb(ppm.getvalue()).size == (8, 8)  # load_rgb alone (operator data) opens what Pillow can


def test_crawl_records_too_many_pixels_in_the_fault_log(tmp_path, servers, monkeypatch):
    """Served over loopback under the tiny profile (1 MP bound): a 20000x20000 header and a real
    1500x1000 image are refused with too_many_pixels; a normal image still goes through."""
    public, _ = servers
    big = io.BytesIO()
    Image.new("RGB", (1500, 1000), (9, 9, 9)).save(big, "PNG")
    bodies = {"/bomb.png": png_header(20000, 20000), "/big.png": big.getvalue()}
    real_get = Handler.do_GET

    def do_get(self):
        if self.path in bodies:
            body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        real_get(self)

    monkeypatch.setattr(Handler, "do_GET", do_get)
    base = f"http://127.0.0.1:{public}"
    storage = LocalStorage(tmp_path / "store")
    cfg = replace(TINY, crawl_timeout_s=2.0)
    result = crawl(_url_list(tmp_path, [f"{base}/bomb.png", f"{base}/big.png", f"{base}/ok.png"]), storage, "raw", cfg)
    ok, failed = read_part_outputs(storage, "raw")
    assert sorted(ok) == [2] and result.failures_by_reason == {"too_many_pixels": 2}
    # 20000^2 is over Pillow's own bound too, which refuses it in Image.open (from the header)
    assert "400000000 pixels" in failed[0]["detail"] and "1500x1000" in failed[1]["detail"]
    assert f"max_image_pixels={cfg.max_image_pixels}" in failed[1]["detail"]
