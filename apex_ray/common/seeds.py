"""One rule for every derived random seed: a hash of the base seed and what the stream is for.

Streams that must differ (per rank, per epoch, per purpose) get seeds that differ in every bit
instead of ``seed * 1_000_003 + rank`` style offsets, which collide (seed 1 rank 0 == seed 0 rank
1_000_003) and are scattered as magic numbers through the code.
"""
from __future__ import annotations

import hashlib


def derive_seed(base: int, *purpose: str | int, bits: int = 32) -> int:
    """A seed for the stream named by ``purpose`` (e.g. ``derive_seed(seed, "noise", rank)``).

    32 bits (the default) suit torch, numpy and Ray Data shuffles; ``bits=64`` (torch generators)
    for streams counted in millions, e.g. one per dataset row, where 32 bits would collide.
    """
    if bits not in (32, 64):
        raise ValueError(f"bits must be 32 or 64, got {bits}")
    text = "/".join([str(int(base)), *map(str, purpose)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=bits // 8).digest(), "little")
