"""Which addresses the crawler may connect to, and connections pinned to the checked address.

Why. URL lists come from the open web, and the crawler runs inside the
platform's own network: next to the storage (MinIO / S3 endpoints), Postgres,
the MLflow and Dagster servers, the cluster's API, and on a cloud VM the
instance metadata service (169.254.169.254, which hands out credentials). A URL
list, or a redirect from a public image host, that points there turns the
crawler into a request forger against the cluster (SSRF): it would fetch from
the inside and store what it got where the outside can read it. So in the
production profiles only globally routable addresses are allowed.

How. `blocked_reason(address)` is the rule, on addresses alone (tests: a
table). `AddressPolicy.resolve_checked(host, port)` resolves a host name,
checks *every* address it resolves to (one bad record refuses the host: a
resolver may rotate them) and returns them; the connection classes of
`guarded_session` then connect to exactly those addresses, so there is no
second DNS lookup between check and connect (a DNS rebinding in between cannot
bypass the check). The Host header, TLS SNI and certificate check still use the
host name: only the socket is pinned. Every connection is checked, so every
redirect hop is too (the crawler follows redirects itself, with a hop limit).
Environment proxies are ignored: a proxy resolves names itself and would make
the check meaningless.

`allow_private=True` (DataConfig.allow_private_addresses, the demo and test
profiles) allows loopback and private networks, for the demo world's server on
127.0.0.1; link-local addresses (169.254.169.254 and the other cloud metadata
endpoints) and the unspecified address stay blocked even then.

No dagster, no mlflow: this is dalle_core.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings
AddressRule = Callable[["ipaddress.IPv4Address | ipaddress.IPv6Address", int], "str | None"]

BLOCKED_REASON = "blocked_address"  # the crawler's failure reason

_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 shared address space (carrier / cloud NAT)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use NAT64: a site's own translator
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_ULA = ipaddress.ip_network("fc00::/7")
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")  # IETF protocol assignments (Python's table varies by version)
# cloud metadata services outside link-local: AWS IMDS over IPv6, Alibaba Cloud (in 100.64/10)
_METADATA = {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}


class BlockedAddressError(Exception):
    """A host that resolves to an address the policy refuses.

    Deliberately not an OSError: urllib3 and requests pass it through unwrapped
    (so it is never retried as a connection error).
    """

    def __init__(self, host: str, address: str, why: str):
        self.host, self.address, self.why = host, address, why
        shown = host if host == address else f"{host} resolves to {address}"
        super().__init__(f"{shown}: {why}, not a public address")


def _parse(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return address
    text = str(address).strip().strip("[]")
    return ipaddress.ip_address(text)


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip in _METADATA:
        return "cloud metadata service"
    if ip.is_multicast:  # Python counts 224/4 as global
        return "multicast"
    if ip in _CGNAT:
        return "shared address space (CGNAT, 100.64/10)"
    if ip.is_reserved:  # 240/4 and the broadcast address
        return "reserved"
    if ip.is_private or ip in _IETF_V4:  # RFC 1918, 0/8, documentation, benchmarking, 192.0.0/24
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def blocked_reason(address) -> str | None:
    """Why `address` is not a public unicast address, or None when it is.

    Loopback, private (RFC 1918 and the special-purpose registries), link-local
    (169.254/16 with cloud metadata, fe80::/10), unspecified, multicast,
    reserved, CGNAT 100.64/10, IPv6 ULA fc00::/7 and site-local fec0::/10, and
    IPv6 forms that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d,
    IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16) judged by
    the IPv4 address they reach; Teredo and local-use NAT64 are refused
    outright (where they lead cannot be told from the address).
    """
    ip = _parse(address)
    if ip.version == 4:
        return _v4_reason(ip)
    if ip.scope_id:  # fe80::1%eth0: the zone does not change what the address is
        ip = ipaddress.IPv6Address(int(ip))
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    embedded, form = None, ""
    if ip.ipv4_mapped is not None:
        embedded, form = ip.ipv4_mapped, "IPv4-mapped"
    elif ip in _NAT64:
        embedded, form = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    elif ip.sixtofour is not None:
        embedded, form = ip.sixtofour, "6to4"
    elif ip in _IPV4_COMPATIBLE:
        embedded, form = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-compatible"
    if embedded is not None:
        inner = _v4_reason(embedded)
        return f"{form} {embedded}: {inner}" if inner else None
    if ip.teredo is not None:
        return "Teredo tunnel"
    if ip in _NAT64_LOCAL:
        return "local-use NAT64"
    if ip.is_link_local:
        return "link-local"
    if ip in _METADATA:
        return "cloud metadata service"
    if ip.is_multicast:  # Python counts ff00::/8 as global
        return "multicast"
    if ip in _ULA:
        return "unique local (fc00::/7)"
    if ip.is_site_local:
        return "site-local (deprecated)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


def _only_link_local(address) -> str | None:
    """The rule under allow_private: everything but link-local, cloud metadata and unspecified."""
    reason = blocked_reason(address)
    if reason and any(word in reason for word in ("link-local", "metadata", "unspecified")):
        return reason
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (getaddrinfo, TCP), in the resolver's order, deduplicated.

    A literal address (also odd forms such as 2130706433 or 0x7f.1) resolves to itself.
    """
    try:
        from urllib3.util.connection import allowed_gai_family

        family = allowed_gai_family()
    except ImportError:  # pragma: no cover - urllib3 is a dependency
        family = socket.AF_UNSPEC
    out: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM):
        addr = sockaddr[0]
        if addr not in out:
            out.append(addr)
    return out


@dataclass(frozen=True)
class AddressPolicy:
    """Resolves host names and refuses non-public addresses (see the module doc).

    `resolver` and `rule` are injectable: tests resolve names without DNS and
    can make one loopback port count as public.
    """

    allow_private: bool = False
    resolver: Resolver = system_resolver
    rule: AddressRule | None = None  # (ip, port) -> reason or None; default: blocked_reason

    def verdict(self, address, port: int = 0) -> str | None:
        ip = _parse(address)
        if self.rule is not None:
            return self.rule(ip, port)
        return _only_link_local(ip) if self.allow_private else blocked_reason(ip)

    def resolve_checked(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, each allowed; else BlockedAddressError.

        Raises socket.gaierror when the name does not resolve.
        """
        host = host.strip("[]")
        addresses = list(self.resolver(host, port))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} resolves to no address")
        for address in addresses:
            try:
                why = self.verdict(address, port)
            except ValueError:
                why = "not an IP address"
            if why:
                raise BlockedAddressError(host, str(address), why)
        return [str(a).strip("[]") for a in addresses]


# --------------------------------------------------------------------------- requests / urllib3


def guarded_session(policy: AddressPolicy, pool_size: int, user_agent: str | None = None):
    """A requests.Session whose every connection is resolved, checked and pinned by `policy`.

    Environment proxies are ignored (a proxy would resolve names itself).
    """
    import requests

    session = requests.Session()
    session.trust_env = False  # no HTTP(S)_PROXY, no .netrc: connect directly to checked addresses
    adapter = _pinned_adapter_class()(policy, pool_connections=max(pool_size, 1), pool_maxsize=max(pool_size, 1), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if user_agent:
        session.headers["User-Agent"] = user_agent
    session.address_policy = policy  # marks the session as guarded
    return session


def _pinned_new_conn(self) -> socket.socket:
    """urllib3's HTTPConnection._new_conn, connecting only to the addresses the policy checked."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
    from urllib3.util.timeout import _DEFAULT_TIMEOUT

    try:
        addresses = self.address_policy.resolve_checked(self._dns_host, self.port)
    except socket.gaierror as e:
        raise NameResolutionError(self.host, self, e) from e
    except UnicodeError as e:
        raise NewConnectionError(self, f"Failed to resolve {self.host!r}: {e}") from e
    last: Exception | None = None
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            for opt in self.socket_options or ():
                sock.setsockopt(*opt)
            if self.timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(self.timeout)
            if self.source_address:
                sock.bind(self.source_address)
            sock.connect((address, self.port))
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock
        except socket.timeout as e:
            last = ConnectTimeoutError(
                self, f"Connection to {self.host} ({address}) timed out. (connect timeout={self.timeout})"
            )
            last.__cause__ = e
        except OSError as e:
            last = NewConnectionError(self, f"Failed to establish a new connection to {address}: {e}")
            last.__cause__ = e
        if sock is not None:
            sock.close()
    assert last is not None
    raise last


@functools.lru_cache(maxsize=None)
def _pinned_adapter_class():
    """requests' HTTPAdapter whose urllib3 pools' connections use `_pinned_new_conn` (built on first use:
    requests is imported lazily, like everywhere in the crawler)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class PinnedAdapter(HTTPAdapter):
        def __init__(self, policy: AddressPolicy, **kwargs):
            self.address_policy = policy  # before HTTPAdapter.__init__, which builds the pool manager
            super().__init__(**kwargs)

        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            attrs = {"_new_conn": _pinned_new_conn, "address_policy": self.address_policy}
            http_conn = type("PinnedHTTPConnection", (HTTPConnection,), attrs)
            https_conn = type("PinnedHTTPSConnection", (HTTPSConnection,), attrs)
            self.poolmanager.pool_classes_by_scheme = {
                "http": type("PinnedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
                "https": type("PinnedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
            }

        def proxy_manager_for(self, proxy, **proxy_kwargs):
            raise BlockedAddressError(str(proxy), str(proxy), "a proxy (the crawler connects only directly)")

    return PinnedAdapter
