"""Strict, bounded parsing of the HTTP/1.1 message heads the probe and the responder exchange.

Both sides need only the first line and a few headers, so a small parser that rejects
anything odd is cheaper and easier to bound than a general one (see docs/http.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

#: The status line: ``HTTP/1.1 200 OK``; the reason phrase may be empty or missing.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
#: The request line: ``GET /hello HTTP/1.1`` (origin-form, absolute-form, ``*``).
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}) ([\x21-\x7e]+) HTTP/1\.([01])")
#: A request line without a version: HTTP/0.9, which Go (and we) answer 400.
_HTTP09 = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [\x21-\x7e]+")
#: A ``%`` not followed by two hex digits.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class MalformedHead(ValueError):
    """A message head that is not HTTP/1.x, or breaks a limit; ``status`` is the reply to send."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RequestHead:
    """What the responder needs from a request: the path, keep-alive and whether a body follows."""

    method: bytes
    path: bytes
    minor: int
    keep_alive: bool
    has_body: bool


def parse_status_line(line: bytes) -> tuple[int, str]:
    """``(status, reason)`` of a response's first line; MalformedHead when it is not one."""
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        raise MalformedHead(f"not an HTTP/1.x status line: {_show(line)}")
    return int(m.group(2)), (m.group(3) or b"").decode("latin-1").strip()


def head_end(buf: bytes) -> tuple[int, int]:
    """``(end, after)`` of the first request head in ``buf``, or ``(-1, -1)`` while incomplete.

    ``buf[:end]`` is the head without its blank line, ``buf[after:]`` what follows. Lines may
    end in CRLF or a bare LF, as Go's textproto reader accepts.
    """
    lf = buf.find(b"\n\n")
    crlf = buf.find(b"\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        end, after = crlf, crlf + 3
    elif lf >= 0:
        end, after = lf, lf + 2
    else:
        return -1, -1
    if buf[end - 1 : end] == b"\r":  # the CR of the last line's CRLF
        end -= 1
    return end, after


#: The shortest request head there is: ``A / HTTP/1.1`` and two LFs.
MIN_HEAD_BYTES = 14


def heads_in(buf: bytes) -> int:
    """How many request heads ``buf`` completes, at most (a bound for pipelining)."""
    return buf.count(b"\n\n") + buf.count(b"\n\r\n")


def check_request_line(line: bytes) -> tuple[bytes, bytes, int]:
    """``(method, target, minor)`` of a request line (CR stripped); MalformedHead otherwise."""
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        if _HTTP09.fullmatch(line):
            raise MalformedHead(f"HTTP/0.9 request (no version): {_show(line)}")
        raise MalformedHead(f"bad request line: {_show(line)}")
    return m.group(1), m.group(2), int(m.group(3))


def parse_request_head(head: bytes, max_headers: int) -> RequestHead:
    """Parse a request head (without its final blank line); MalformedHead on anything odd."""
    # CRLF or bare LF; a CR anywhere else is left in place and refused below.
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    method, target, minor = check_request_line(lines[0])
    if len(lines) - 1 > max_headers:
        raise MalformedHead(f"more than {max_headers} header fields", 431)
    keep_alive = minor == 1
    has_body = False
    length: bytes | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise MalformedHead(f"bad header field: {_show(line)}")
        lname = name.lower()
        if lname == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
        elif lname == b"content-length":
            v = value.strip(b" \t")
            if not v.isdigit():
                raise MalformedHead(f"bad Content-Length: {_show(v)}")
            if length is not None and v != length:  # Go: identical repeats are one value
                raise MalformedHead("two different Content-Length headers")
            length = v
            has_body = has_body or int(v) > 0
        elif lname == b"transfer-encoding":
            has_body = True
    return RequestHead(method, _path_of(target), minor, keep_alive, has_body)


def _path_of(target: bytes) -> bytes:
    """The decoded path of a request target, without its query; absolute-form is reduced to
    its path. Percent-escapes are decoded as Go decodes ``URL.Path``; a malformed one is an
    error (Go answers such a request 400)."""
    if target[:1] != b"/":
        scheme, sep, rest = target.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
    end = target.find(b"?")
    path = target if end < 0 else target[:end]
    if b"%" in path:
        if _BAD_ESCAPE.search(path):
            raise MalformedHead(f"bad percent-encoding in path: {_show(path)}")
        path = unquote_to_bytes(path)
    return path


def _show(data: bytes, limit: int = 40) -> str:
    """Bytes as a short printable literal for an error text."""
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")
