"""Fetching one URL over HTTP: what the crawler does for each row of a URL list.

Each download: GET with `timeout_s` for connect and for each read (and at most
`TOTAL_TIMEOUT_FACTOR` times that for the whole body), retries of connection
errors, timeouts, HTTP 429 and 5xx with exponential back-off
(`backoff_s * 2**attempt` plus up to 25% jitter, or the server's `Retry-After`
when larger, bounded by `MAX_RETRY_AFTER_S`); other 4xx are final. Redirects
are followed here, at most `MAX_REDIRECTS` hops.

Addresses (`dalle_core.data.net_guard`): every connection, so every redirect
hop, resolves its host, checks all the addresses it resolves to and connects to
one of exactly those (no second DNS lookup). Unless
`DataConfig.allow_private_addresses` (the demo and test profiles, for the demo
world on 127.0.0.1), only globally routable addresses are allowed: a URL list
from the open web cannot make the crawler fetch from the cluster's own services
or the cloud metadata endpoint. A refused target fails with `blocked_address`
and is not retried.

The body must have an image content type (or a generic octet-stream one, left
to the decoder to decide) and fit in `max_body_bytes`. Failures carry the
crawler's reasons (`dalle_core.data.crawl.FAILURE_REASONS`, `http_<code>`).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from .config import DataConfig
from .net_guard import AddressPolicy, BlockedAddressError, guarded_session

MAX_BODY_BYTES = 20 * 1024 * 1024  # bodies are streamed and cut off past this
MAX_REDIRECTS = 5  # redirect hops followed per download (each hop's address is checked)
MAX_RETRY_AFTER_S = 30.0  # a server's Retry-After is honoured up to this
TOTAL_TIMEOUT_FACTOR = 3.0  # whole-body deadline, in units of the timeout
JITTER = 0.25  # back-off jitter, as a fraction of the back-off
USER_AGENT = "dalle-platform-crawler/0.1 (+img2dataset-compatible)"
_OCTET = ("application/octet-stream", "binary/octet-stream")  # decoded to decide


class FetchStopped(Exception):
    """`stop` was set: the download was not started, or its back-off was cut short."""


def make_session(workers: int, policy: AddressPolicy | None = None):
    """A `requests.Session` whose connection pool is sized to the workers and whose every
    connection is resolved, checked and pinned by `policy` (default: public addresses only)."""
    return guarded_session(policy if policy is not None else AddressPolicy(), workers, USER_AGENT)


def address_policy_for(config: DataConfig) -> AddressPolicy:
    """The address policy of a DataConfig: public addresses only unless allow_private_addresses."""
    return AddressPolicy(allow_private=bool(config.allow_private_addresses))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _is_timeout(exc: BaseException) -> bool:
    """requests wraps read timeouts during streaming in ConnectionError.

    (urllib3's NewConnectionError subclasses ConnectTimeoutError for history's
    sake; a refused connection is a connection_error, so only read timeouts
    and socket timeouts count here. Connect timeouts arrive as requests'
    ConnectTimeout and are caught before this.)
    """
    import socket

    from urllib3.exceptions import NewConnectionError, ReadTimeoutError

    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NewConnectionError):
            continue
        if isinstance(e, (ReadTimeoutError, socket.timeout, TimeoutError)):
            return True
        stack.extend([e.__cause__, e.__context__])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        reason = getattr(e, "reason", None)  # urllib3's MaxRetryError
        if isinstance(reason, BaseException):
            stack.append(reason)
    return False


@dataclass
class FetchResult:
    """The outcome of a download: the body, or why there is none."""

    ok: bool
    data: bytes = b""
    content_type: str = ""
    reason: str = ""
    detail: str = ""
    retryable: bool = False
    retry_after: float | None = None


def _fail(reason, detail, retryable=False, retry_after=None) -> FetchResult:
    return FetchResult(False, reason=reason, detail=str(detail)[:500], retryable=retryable, retry_after=retry_after)


def _get_once(session, url: str, timeout_s: float, max_body_bytes: int, start: float, deadline: float):
    """One GET without following redirects: the outcome, or the next URL when redirected."""
    with session.get(url, timeout=(timeout_s, timeout_s), stream=True, allow_redirects=False) as r:
        code = r.status_code
        if r.is_redirect:  # 301, 302, 303, 307, 308 with a Location
            from requests.compat import urljoin

            return urljoin(r.url, session.get_redirect_target(r))
        if not 200 <= code < 300:
            retryable = code == 429 or 500 <= code < 600
            return _fail(
                f"http_{code}",
                f"HTTP {code} {r.reason or ''}".strip(),
                retryable,
                _parse_retry_after(r.headers.get("Retry-After")) if retryable else None,
            )
        ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype not in _OCTET:
            return _fail("not_image", f"content type {ctype!r}")
        length = r.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return _fail("too_large", f"Content-Length {length} > {max_body_bytes} bytes")
        buf = bytearray()
        for chunk in r.iter_content(chunk_size=64 * 1024):
            buf += chunk
            if len(buf) > max_body_bytes:
                return _fail("too_large", f"body over {max_body_bytes} bytes")
            if time.monotonic() > deadline:
                return _fail("timeout", f"body not complete after {deadline - start:.1f}s", True)
        return FetchResult(True, data=bytes(buf), content_type=ctype)


def _download_once(session, url: str, timeout_s: float, max_body_bytes: int) -> FetchResult:
    import requests

    start = time.monotonic()
    deadline = start + timeout_s * TOTAL_TIMEOUT_FACTOR
    hop, current = 0, url
    try:
        while True:
            attempt = _get_once(session, current, timeout_s, max_body_bytes, start, deadline)
            if isinstance(attempt, FetchResult):
                return attempt
            if hop == MAX_REDIRECTS:
                return _fail("connection_error", f"TooManyRedirects: more than {MAX_REDIRECTS} redirects")
            hop, current = hop + 1, attempt
            if current.split(":", 1)[0].lower() not in ("http", "https"):
                return _fail("invalid_url", f"redirect {hop} to {current!r}: not an http(s) URL")
    except BlockedAddressError as e:
        where = f" (redirect {hop} to {current})" if hop else ""
        return _fail("blocked_address", f"{e}{where}")
    except requests.exceptions.Timeout as e:
        return _fail("timeout", f"{type(e).__name__}: {e}", True)
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        requests.exceptions.URLRequired,
    ) as e:
        return _fail("invalid_url", f"{type(e).__name__}: {e}")
    except requests.exceptions.TooManyRedirects as e:
        return _fail("connection_error", f"TooManyRedirects: {e}")
    except requests.exceptions.RequestException as e:  # ConnectionError, ChunkedEncodingError, ...
        if _is_timeout(e):
            return _fail("timeout", f"{type(e).__name__}: {e}", True)
        return _fail("connection_error", f"{type(e).__name__}: {e}", True)
    except (OSError, ValueError) as e:  # socket errors outside requests' wrapping; odd URLs
        return _fail("connection_error", f"{type(e).__name__}: {e}", True)


def fetch(session, url: str, *, timeout_s: float, retries: int, backoff_s: float, stop: threading.Event,
          max_body_bytes: int = MAX_BODY_BYTES) -> tuple[FetchResult, int]:
    """GET `url`, retrying what is worth retrying (see the module doc) at most
    `retries` times. Returns the last outcome and how many attempts it took;
    raises FetchStopped when `stop` is set before an attempt or during a back-off."""
    result: FetchResult | None = None
    attempts = 0
    for attempt in range(retries + 1):
        if stop.is_set():
            raise FetchStopped()
        attempts += 1
        result = _download_once(session, url, timeout_s, max_body_bytes)
        if result.ok or not result.retryable or attempt == retries:
            break
        delay = backoff_s * 2**attempt
        delay += random.uniform(0.0, JITTER * delay)
        if result.retry_after is not None:
            delay = max(delay, min(result.retry_after, MAX_RETRY_AFTER_S))
        if stop.wait(delay):
            raise FetchStopped()
    assert result is not None
    return result, attempts
