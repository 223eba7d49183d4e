"""The ``http`` and ``https`` check kinds: one request per URL; status, TLS and certificate.

Each check connects (timed), does the TLS handshake for https (timed; the server
certificate's days until expiry are read from it), sends one ``GET`` (or ``HEAD``) with h11
and reads the status line and headers. The body is not read. ``https`` is ``http`` that
accepts https URLs only.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import anyio
import h11
import msgspec
from anyio.streams.tls import TLSAttribute, TLSStream

from healthmesh import (
    Check,
    CheckSettings,
    CheckUnavailable,
    ProbeResult,
    __version__,
    format_duration,
    hookimpl,
)
from healthmesh.plugins.checks import MAX_TARGETS, config_relative, split_host_port
from healthmesh.plugins.checks.tcp import os_error_text

MAX_HEADER_BYTES = 64 * 1024


class HttpSettings(CheckSettings, kw_only=True):
    """``[checks.<name>]`` with ``kind = "http"`` or ``"https"``."""

    #: URLs: ``http://host[:port]/path`` or ``https://...``.
    targets: list[str]
    #: Statuses that count as ok; empty: any 2xx or 3xx.
    expect_status: list[int] = msgspec.field(default_factory=list)
    method: Literal["GET", "HEAD"] = "GET"
    #: PEM file of the CA(s) to verify the server with; default: the system's.
    ca_file: str | None = None
    #: Do not verify the server certificate (still timed, and its expiry still read).
    insecure: bool = False
    #: Fail when the server certificate expires within this many days (0: never).
    min_cert_days: int = 0


def parse_url(url: str, schemes: tuple[str, ...]) -> tuple[str, str, int, str]:
    """(scheme, host, port, path-with-query) of a URL; ValueError says what is wrong."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ValueError(f"{url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ValueError(f"{url!r}: the scheme must be {' or '.join(schemes)}")
    if not parts.netloc or "@" in parts.netloc:
        raise ValueError(f"{url!r}: needs a host (and no user info)")
    default = 443 if parts.scheme == "https" else 80
    host, port = split_host_port(parts.netloc, default)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, port, path


class HttpCheck(Check):
    """Requests every URL; ok when the status is expected (and the certificate is fresh)."""

    name = "http"
    Settings = HttpSettings
    schemes: ClassVar[tuple[str, ...]] = ("http", "https")

    @classmethod
    def validate_settings(cls, settings: HttpSettings, config: Any) -> None:
        if not settings.targets:
            raise ValueError("targets: at least one URL is required")
        if len(settings.targets) > MAX_TARGETS:
            raise ValueError(f"targets: {len(settings.targets)} URLs; at most {MAX_TARGETS}")
        for i, url in enumerate(settings.targets):
            try:
                parse_url(url, cls.schemes)
            except ValueError as exc:
                raise ValueError(f"targets[{i}]: {exc}") from None
        if len(set(settings.targets)) != len(settings.targets):
            raise ValueError("targets: duplicate URL")
        for i, status in enumerate(settings.expect_status):
            if not 100 <= status <= 599:
                raise ValueError(f"expect_status[{i}]: {status} is not an HTTP status")
        if not 0 <= settings.min_cert_days <= 3650:
            raise ValueError("min_cert_days: must be between 0 and 3650")
        if settings.ca_file is not None and settings.insecure:
            raise ValueError("insecure: cannot be combined with ca_file")
        if settings.ca_file is not None:
            settings.ca_file = config_relative(settings.ca_file, config)

    def __init__(self, settings: Any, context: Any, check_name: str = "") -> None:
        super().__init__(settings, context, check_name)
        self._tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> HttpCheck:
        if any(u.startswith("https:") for u in self.settings.targets):
            self._tls = await anyio.to_thread.run_sync(self._tls_context)
        return self

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        if s.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            return ssl.create_default_context(cafile=s.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise CheckUnavailable(f"ca_file {s.ca_file}: {_ssl_text(exc)}") from None

    def targets(self) -> list[str]:
        return list(self.settings.targets)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {"method": s.method, "expect_status": s.expect_status or "2xx/3xx"}
        if s.ca_file:
            out["ca_file"] = str(Path(s.ca_file))
        if s.insecure:
            out["insecure"] = True
        return out

    async def check(self, target: str, timeout: float) -> ProbeResult:
        scheme, host, port, path = parse_url(target, self.schemes)
        details: dict[str, Any] = {}
        start = time.perf_counter()
        step = "connect"
        try:
            with anyio.fail_after(timeout):
                stream: Any = await anyio.connect_tcp(host, port)
                details["connect_ms"] = _ms(time.perf_counter() - start)
                try:
                    if scheme == "https":
                        step = "TLS handshake"
                        t = time.perf_counter()
                        assert self._tls is not None
                        stream = await TLSStream.wrap(
                            stream, hostname=host, ssl_context=self._tls,
                            standard_compatible=False,
                        )
                        details["tls_ms"] = _ms(time.perf_counter() - t)
                        der = stream.extra(TLSAttribute.ssl_object).getpeercert(binary_form=True)
                        try:
                            details["cert_expiry_days"] = round(cert_days_left(der), 2)
                        except (ValueError, IndexError, TypeError):
                            details["cert_expiry_days"] = None  # unreadable: not an error
                    step = "request"
                    status = await self._request(stream, host, port, path, scheme)
                finally:
                    await _close(stream)
        except TimeoutError:
            return ProbeResult.failure(
                f"timeout during {step} after {format_duration(round(timeout, 3))}", **details
            )
        except ssl.SSLError as exc:
            return ProbeResult.failure(f"TLS: {_ssl_text(exc)}", **details)
        except OSError as exc:
            return ProbeResult.failure(f"{step}: {os_error_text(exc)}", **details)
        except (h11.ProtocolError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            return ProbeResult.failure(f"{step}: bad or no HTTP answer ({exc or 'closed'})",
                                       **details)
        rtt = time.perf_counter() - start
        details["status"] = status
        want = self.settings.expect_status
        if (status not in want) if want else not 200 <= status < 400:
            return ProbeResult.failure(f"status {status}, expected {_want_text(want)}", **details)
        days = details.get("cert_expiry_days")
        if self.settings.min_cert_days and days is not None and days < self.settings.min_cert_days:
            return ProbeResult.failure(
                f"certificate expires in {days:.1f} days (min_cert_days = "
                f"{self.settings.min_cert_days})", **details,
            )
        return ProbeResult.success(rtt, **details)

    async def _request(self, stream: Any, host: str, port: int, path: str, scheme: str) -> int:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        default = 443 if scheme == "https" else 80
        authority = f"[{host}]" if ":" in host else host
        if port != default:
            authority += f":{port}"
        request = h11.Request(
            method=self.settings.method, target=path,
            headers=[("Host", authority), ("User-Agent", f"healthmesh/{__version__}"),
                     ("Accept", "*/*"), ("Connection", "close")],
        )
        await stream.send(conn.send(request) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                return int(event.status_code)
            if isinstance(event, h11.ConnectionClosed):
                raise anyio.EndOfStream


class HttpsCheck(HttpCheck):
    """``http`` for https URLs only: TLS handshake time and certificate expiry always shown."""

    name = "https"
    schemes = ("https",)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _want_text(want: list[int]) -> str:
    return " or ".join(str(w) for w in want) if want else "2xx or 3xx"


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    return getattr(exc, "reason", None) or str(exc)


async def _close(stream: Any) -> None:
    with anyio.move_on_after(0.5, shield=True):
        try:
            await stream.aclose()
        except Exception:
            return


# --- the certificate's notAfter, read from its DER (no X.509 library needed) ------------


def _der(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, pos, end


def cert_not_after(der: bytes) -> datetime:
    """The ``notAfter`` time of an X.509 certificate in DER form (UTC)."""
    _, cert, _ = _der(der, 0)  # Certificate ::= SEQUENCE
    _, pos, _ = _der(der, cert)  # tbsCertificate ::= SEQUENCE
    tag, _, end = _der(der, pos)
    if tag == 0xA0:  # [0] version, optional
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _der(der, pos)
    _, validity, _ = _der(der, pos)  # validity ::= SEQUENCE { notBefore, notAfter }
    _, _, after = _der(der, validity)
    tag, start, end = _der(der, after)
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("notAfter is not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)


def cert_days_left(der: bytes, now: float | None = None) -> float:
    """Days until the certificate expires (negative once expired)."""
    now = time.time() if now is None else now
    return (cert_not_after(der).timestamp() - now) / 86400.0


@hookimpl
def register_check_kinds(register: Callable[[type[Check]], None]) -> None:
    register(HttpCheck)
    register(HttpsCheck)
