"""One rule for every derived random seed: a hash of the base seed and what the stream is for.

Streams that must differ (per rank, per epoch, per purpose) get seeds that differ in every bit
instead of ``seed * 1_000_003 + rank`` style offsets, which collide (seed 1 rank 0 == seed 0 rank
1_000_003) and are scattered as magic numbers through the code.
"""
from __future__ import annotations

import hashlib


def derive_seed(base: int, *purpose: str | int) -> int:
    """A 32-bit seed (valid for torch, numpy and Ray Data shuffles) for the stream named by ``purpose`` (e.g. ``derive_seed(seed, "noise", rank)``)."""
    text = "/".join([str(int(base)), *map(str, purpose)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
