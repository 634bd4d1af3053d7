"""File names that are not UTF-8, recorded losslessly.

Python hands such names over with surrogate escapes ("a\\udcff.mp4"); Arrow and JSON-as-UTF-8 refuse them. A
table stores a readable form in `source` (undecodable bytes shown as \\xNN) and the exact bytes in
`source_raw` (null for the usual, valid names); `decode_name` gives back the original str.
"""

from __future__ import annotations

import pyarrow as pa


def encode_name(name: str) -> tuple[str, bytes | None]:
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), raw


def decode_name(display: str, raw: bytes | None) -> str:
    return raw.decode("utf-8", "surrogateescape") if raw is not None else display


def name_columns(names: list[str]) -> tuple[pa.Array, pa.Array]:
    """(source, source_raw) columns for a list of names."""
    pairs = [encode_name(n or "") for n in names]
    return pa.array([p[0] for p in pairs], pa.string()), pa.array([p[1] for p in pairs], pa.binary())
