"""Complete-or-absent files: a writer fills a temporary name beside the target, and only a
finished file is renamed into place (``os.replace`` is atomic on one filesystem), so a crash
never leaves a partial file under the real name."""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TMP_PREFIX = ".tmp-"
"""Names of in-progress files; a folder's owner may remove them as its own leftovers."""


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``target`` that replaces it on success and is removed on failure."""
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(target: str | os.PathLike, payload: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
