"""One compact JSON encoder for snapshots and the documents built from them (msgspec)."""

from __future__ import annotations

from typing import Any

import msgspec


def _enc_hook(obj: Any) -> Any:
    # Config types such as Name (a str) and Duration (a float) reach the snapshot.
    for base in (str, float, int):
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


#: The shared encoder (``encode``, ``encode_into``): config subtypes become plain JSON values.
json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode_json(obj: Any) -> bytes:
    """Compact JSON bytes of ``obj`` (a snapshot's data or anything built from it)."""
    return json_encoder.encode(obj)
