"""Sizes as people write them (``5GB``, ``500MiB``), for flags and environment variables alike."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def parse_size(text: str) -> int:
    """``5GB`` -> 5e9 bytes, ``500MiB`` -> 500 * 2**20; a bare number is bytes. Raises ValueError for anything else,
    zero included."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 5GB or 500MB)")
    unit = (match.group(2) or "").upper().rstrip("B")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r} (try 5GB or 500MB)")
    return size
