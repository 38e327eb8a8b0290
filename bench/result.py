"""One machine-readable line per benchmark, collected by ``bench/run_all.py``."""
from __future__ import annotations

import json

PREFIX = "BENCH-RESULT "


def report(name: str, ratio: float, meaning: str, **detail) -> None:
    """Print ``BENCH-RESULT {...}``: the headline ratio, what it means, and the raw numbers."""
    print(PREFIX + json.dumps({"name": name, "ratio": round(float(ratio), 4), "meaning": meaning, **detail}),
          flush=True)
