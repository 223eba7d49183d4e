"""``[outputs.web]``: where the page listens, its optional credentials, limits and history."""

from __future__ import annotations

from healthmesh import ComponentSettings, Duration, check_ranges, parse_listen

DEFAULT_LISTEN = "127.0.0.1:9968"

#: (key, lowest, highest) of each numeric limit: values outside make no sense or cannot work.
LIMIT_BOUNDS: dict[str, tuple[float, float]] = {
    # A browser opens about six connections per page; below that the page itself starves.
    "max_connections": (8, 4096),
    # Seconds. Too short drops a browser's keep-alive between two polls; a day is plenty.
    "idle_timeout": (0.5, 3600.0),
    # A browser's request head is under 2 KiB, with cookies of other pages on the host more.
    "max_header_bytes": (2048, 256 * 1024),
    # How much history each path keeps: a minute to a day.
    "history": (60.0, 86400.0),
    # Points per path and kind at most, whatever history / interval says.
    "max_points": (10, 100_000),
}


class WebSettings(ComponentSettings):
    """``[outputs.web]``: the web page."""

    #: ADDR:PORT to listen on (IPv6 in brackets); port 0 picks a free one (logged).
    listen: str = DEFAULT_LISTEN
    #: Bearer token a request must carry (``Authorization: Bearer T``); "" for none.
    token: str = ""
    #: Basic-auth user and password (both or neither); a browser prompts for them.
    username: str = ""
    password: str = ""
    #: Open connections at most; at the cap the oldest idle one is closed to admit a new one.
    max_connections: int = 64
    #: A connection must send a complete request head within this time of connecting or of
    #: its previous answer, and read an answer within it; else it is closed.
    idle_timeout: Duration = Duration(15.0)
    #: Request line and headers together, in bytes; more gets 431.
    max_header_bytes: int = 16 * 1024
    #: How long each path's RTT/loss history reaches back (one point per probe round).
    history: Duration = Duration(3600.0)
    #: Cap on points per path and kind (a short interval would otherwise make many).
    max_points: int = 3600

    @classmethod
    def validate(cls, settings: WebSettings) -> None:
        """Raise ValueError naming the key when a value cannot work."""
        parse_web_listen(settings.listen)
        if settings.username and not settings.password:
            raise ValueError("password: required with username (basic auth needs both)")
        if settings.password and not settings.username:
            raise ValueError("username: required with password (basic auth needs both)")
        if ":" in settings.username:
            raise ValueError("username: must not contain ':' (basic auth separates on it)")
        check_ranges(settings, LIMIT_BOUNDS)


def parse_web_listen(text: str) -> tuple[str, int]:
    """``(address, port)`` of the page's ``listen``; ValueError ``listen: ...`` saying why not."""
    try:
        return parse_listen(text, example=DEFAULT_LISTEN)
    except ValueError as exc:
        raise ValueError(f"listen: {exc}") from None


def url_of(address: str, port: int) -> str:
    """The page's URL for a bound address (0.0.0.0 and :: shown as loopback, reachable here)."""
    if address == "0.0.0.0":
        address = "127.0.0.1"
    elif address == "::":
        address = "::1"
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/"
