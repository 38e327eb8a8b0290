"""Complete-or-nothing output folders of parquet shards written by Ray Data.

While a job runs, its output folder (the one the user named) holds, besides a complete set
from an earlier run if there is one, only what the job itself made::

    <output>/.apex-data-job.lock      exclusive lock (fcntl.flock); its holder's job, run id, pid, host
    <output>/.staging-<run id>/
        owner.json                    ownership marker: tool, job, run id, pid, host, state
        parts/                        what the Ray write tasks wrote (shards/, rejects/)
        set/                          the new set, assembled: shards/, the job's files, manifest.json
        old/                          during the commit only: the set being replaced

Guarantees (docs/reliability.md, "Data jobs"):

- **Lock.** One job at a time per output folder: a second job fails at once with a message naming
  the holder (:class:`FolderLock`, or waits for it with ``wait=True``). The kernel drops the lock
  when its process dies, so a crashed job never leaves a stale lock.
- **Ownership.** Nothing a user made is deleted. A leftover staging folder is removed only if it
  carries this tool's ownership marker; the entries of a complete set are ours only as named by
  its manifest. Anything else in the folder (``shards/`` or ``rejects.parquet`` without a
  manifest included) makes the job refuse to start, and an input inside the output folder (or the
  output inside an input folder) is refused up front (:func:`refuse_overlap`).
- **Atomic commit and overwrite swap.** The new set, manifest included, is complete in
  ``set/`` before anything outside the staging folder changes; then :func:`swap_in` moves the
  old set's entries into ``old/`` and the new ones into place, the manifest last. The manifest's
  presence marks a complete output. With ``overwrite`` the old set stays complete and readable
  until that swap, so an interrupted or failed run leaves it as it was. The swap is recorded in
  the marker (``state: committing``) and is idempotent: interrupted inside it, the job (or the
  next run, for a killed one) finishes it, so the folder holds the old set or the new one, never
  neither.

A file left by a write task that Ray retried is named in no write result and goes with the staging
folder, so no row is committed twice.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from apex_ray.common.files import write_json_atomic
from apex_ray.engine.prepared import EMPTY_PROMPT, FAKE_BUFFER, PREPARED_SET, REJECTS
from data_pipelines.sink import (  # noqa: F401  (re-exported: the sink lives in a module light enough for write tasks)
    REJECT_COLUMNS,
    REJECT_PARTS,
    SHARDS,
    WRITE_TASK_CPUS,
    RollingParquetWriter,
    StagedShardSink,
    split_rejects,
)

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".apex-data-job.lock"
MARKER = "owner.json"
"""Ownership marker inside a staging folder."""
TOOL = "apex-ray data_pipelines"
"""The ``tool`` of every marker, lock record and manifest ``owner`` this module writes."""
PARTS, NEW, OLD = "parts", "set", "old"
"""Staging subfolders: write-task output, the new set being assembled, the set being replaced."""
WRITING, COMMITTING = "writing", "committing"
LEGACY_ENTRIES = {PREPARED_SET: (SHARDS, REJECTS, EMPTY_PROMPT), FAKE_BUFFER: (SHARDS,)}
"""Entries of a complete set whose manifest predates the ``owner`` record, by manifest ``kind``."""

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The output folder cannot be used; the message says what to do."""


# --- lock ---------------------------------------------------------------------------------------


class FolderLock:
    """Exclusive lock on ``folder``: ``fcntl.flock`` on ``folder/.apex-data-job.lock``, which holds
    a record of the holder (job, run id, pid, host, since) for the message a contender gets.

    The kernel releases the lock when the holder's process dies (on NFS/EFS too, through the
    server's lease), so there is no stale lock to detect. The holder removes the file when it
    releases; a contender that locked the removed file sees it is no longer the one at the path
    and tries again.
    """

    def __init__(self, folder: str | os.PathLike, job: str, run_id: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.job = job
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, timeout_s: float | None = None, poll_s: float = 0.2) -> "FolderLock":
        """Take the lock. Held by another job: raise :class:`OutputError` naming it, or with
        ``wait`` poll until it is free (at most ``timeout_s`` seconds, if given)."""
        started, waiting_logged = time.monotonic(), 0.0
        while True:
            fd = self._try_lock()
            if fd is not None:
                self._fd = fd
                self._write_record()
                return self
            holder = self.holder()
            waited = time.monotonic() - started
            if not wait or (timeout_s is not None and waited >= timeout_s):
                raise OutputError(
                    f"{str(self.folder)!r} is in use by {holder}"
                    f"{f' (waited {waited:.0f} s)' if wait else ''}; wait for that job to finish, or choose "
                    "another output folder. The lock is released when its process ends, whatever way it ends"
                )
            if waited >= waiting_logged:
                log.info("%s: waiting for %s to finish with %s", self.job, holder, self.folder)
                waiting_logged = waited + 60.0
            time.sleep(poll_s)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)  # while still locked: a waiter re-checks the path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> str:
        """Who holds the lock, as a contender can tell from the lock file's record."""
        try:
            record = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            record = {}
        if not record.get("pid"):
            return "another job (it has not recorded itself yet)"
        return (f"{record.get('job', 'a data job')} run {record.get('run_id', '?')} (pid {record['pid']} on "
                f"host {record.get('host', '?')}, since {record.get('since', '?')})")

    def __enter__(self) -> "FolderLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _try_lock(self) -> int | None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise OutputError(f"cannot write to output folder {str(self.folder)!r}: {error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise OutputError(
                        f"cannot lock {str(self.path)!r}: the filesystem does not support file locks ({error}); "
                        "use an output folder on a local disk or an NFSv4/EFS mount") from None
                raise
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # the holder removed the file as we locked it: lock the new one

    def _write_record(self) -> None:
        record = {"tool": TOOL, "job": self.job, "run_id": self.run_id, "pid": os.getpid(),
                  "host": socket.gethostname(), "since": _now()}
        data = json.dumps(record).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def locked_folder(folder: str | os.PathLike, job: str, wait: bool = False,
                  timeout_s: float | None = None) -> Iterator[FolderLock]:
    """``with locked_folder(path, job, wait=True):`` — :class:`FolderLock` as a context manager."""
    lock = FolderLock(folder, job).acquire(wait=wait, timeout_s=timeout_s)
    try:
        yield lock
    finally:
        lock.release()


# --- inputs and outputs -------------------------------------------------------------------------


def refuse_overlap(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Raise :class:`OutputError` if an input is the output folder or inside it (a job owns its
    output folder and replaces what it wrote there), or the output is inside an input folder (the
    next run would read the written shards as input). URIs are not checked."""
    out = os.path.realpath(output)
    for name, path in inputs.items():
        if path is None or "://" in str(path):
            continue
        source = os.path.realpath(path)
        if _inside(source, out):
            raise OutputError(
                f"{name} {str(path)!r} is inside the output folder {str(output)!r}; the job replaces what is in "
                "its output folder, so it does not run there: choose an output folder outside the input")
        if os.path.isdir(source) and _inside(out, source):
            raise OutputError(
                f"output folder {str(output)!r} is inside the {name} folder {str(path)!r}; what the job writes would "
                f"become part of its {name} (a later run would read the shards as input): choose an output folder "
                f"outside the {name}")


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def read_marker(staging: Path) -> dict[str, Any] | None:
    """The ownership marker of a staging folder, or None if it carries none of ours."""
    try:
        marker = json.loads((staging / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("tool") != TOOL
            or f"{STAGING_PREFIX}{marker.get('run_id')}" != staging.name):
        return None
    return marker


def content_hash(shards: list[dict[str, Any]]) -> str | None:
    """The set's content digest: SHA-256 over its shards' own digests, sorted (which task wrote
    which shard does not change it). ``None`` when a shard has no digest."""
    digests = [shard.get("sha256") for shard in shards]
    if not digests or None in digests:
        return None
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def set_entries(manifest: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The entries (besides ``manifest.json``) of the complete set this manifest describes, or
    None if no job of this tool wrote it."""
    owner = manifest.get("owner")
    if isinstance(owner, dict) and owner.get("tool") == TOOL and isinstance(owner.get("entries"), list):
        return tuple(str(name) for name in owner["entries"])
    return LEGACY_ENTRIES.get(manifest.get("kind"))


class StagedOutput:
    """An output folder being written by one job run; use as a context manager.

    Opening it takes the folder's lock, refuses foreign files and a complete set (unless
    ``overwrite``), and removes or finishes this tool's leftovers. The job assembles the new set
    in :attr:`new`; :meth:`finish` swaps it in. On an exception before the swap only the staging
    folder is removed (a complete set already there stays as it was); one inside the swap
    finishes it. ``owned`` names the files the job writes beside the manifest and the shards.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool, job: str, owned: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.job = job
        self.owned = tuple(dict.fromkeys((SHARDS, *owned)))
        self.run_id = uuid.uuid4().hex[:12]
        self.replaces: tuple[str, ...] = ()
        self._entries: list[str] = []
        self._state: str | None = None
        self._make_folder()
        self._lock = FolderLock(self.path, job, self.run_id).acquire()
        try:
            self._prepare_folder(overwrite)
            self.staging = self.path / f"{STAGING_PREFIX}{self.run_id}"
            self.new = self.staging / NEW
            try:
                self.staging.mkdir()
                self._write_marker(WRITING)
                self.new.mkdir()
            except OSError as error:
                shutil.rmtree(self.staging, ignore_errors=True)
                raise OutputError(f"cannot write to output folder {str(self.path)!r}: {error}") from None
        except BaseException:
            self._lock.release()
            raise

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is not None and self._state == WRITING:
                shutil.rmtree(self.staging, ignore_errors=True)
            elif error_type is not None and self._state == COMMITTING:
                log.warning("%s: interrupted while swapping the new set into %s; finishing the swap",
                            self.job, self.path)
                swap_in(self.path, self.staging, self._entries, self.replaces)
                shutil.rmtree(self.staging, ignore_errors=True)
                self._state = None
        finally:
            self._lock.release()

    def sink(self, rows_per_shard: int) -> "StagedShardSink":
        return StagedShardSink(str(self.staging / PARTS), rows_per_shard)

    def stage_shards(self, results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Path]]:
        """Move the written shards into the new set's ``shards/`` as ``shard-00000.parquet``...;
        returns the manifest's shard list (file, rows, sha256) and the staged reject files."""
        shard_dir = self.new / SHARDS
        shard_dir.mkdir(exist_ok=True)
        shards, rejects = [], []
        for result in sorted(results, key=lambda r: r["task"]):
            for staged, rows in result[SHARDS]:
                name = f"shard-{len(shards):05d}.parquet"
                os.replace(self.staging / PARTS / SHARDS / staged, shard_dir / name)
                shards.append({"file": f"{SHARDS}/{name}", "rows": rows, "sha256": result.get("sha256", {}).get(staged)})
            rejects += [self.staging / PARTS / REJECT_PARTS / staged for staged, _ in result[REJECT_PARTS]]
        return shards, rejects

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest into the new set, then swap the set into the output folder (the
        manifest last, marking it complete) and drop the staging folder. Returns the manifest
        as written (with its ``owner`` record)."""
        entries = self._entries = [name for name in self.owned if (self.new / name).exists()]
        manifest = {**manifest, "owner": {"tool": TOOL, "job": self.job, "run_id": self.run_id, "entries": entries}}
        write_json_atomic(self.new / MANIFEST, manifest)
        self._write_marker(COMMITTING, entries=entries, replaces=list(self.replaces))
        swap_in(self.path, self.staging, entries, self.replaces)
        self._state = None
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest

    # --- opening the folder ---

    def _make_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output {str(self.path)!r} is a file; pass a folder path")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create output folder {str(self.path)!r}: {error}") from None

    def _prepare_folder(self, overwrite: bool) -> None:
        """Under the lock: finish or remove this tool's leftovers, then check what is left."""
        for name in sorted(os.listdir(self.path)):
            if name.startswith(STAGING_PREFIX) and (self.path / name).is_dir():
                self._clear_leftover(self.path / name)
        entries = sorted(set(os.listdir(self.path)) - {LOCK_FILE})
        existing = self._existing_set() if MANIFEST in entries else None
        ours = {MANIFEST, *existing[1]} if existing else set()
        foreign = [name for name in entries if name not in ours]
        if foreign:
            hint = "" if existing else " (there is no manifest.json, so none of it is taken for a set this job made)"
            raise OutputError(
                f"output folder {str(self.path)!r} holds files {self.job} did not write ({', '.join(foreign[:5])})"
                f"{hint}; nothing was deleted: choose an empty or new folder, or move those files away"
            )
        if existing is None:
            return
        kind, entries_of_set = existing
        if not overwrite:
            raise OutputError(
                f"{str(self.path)!r} already holds a complete {kind} (manifest.json); pass --overwrite "
                "(overwrite=True) to replace it, or choose another output folder"
            )
        log.warning("%s: %s holds a complete %s; it stays in place until the new one is complete, then is "
                    "replaced (overwrite)", self.job, self.path, kind)
        self.replaces = tuple(name for name in entries_of_set if (self.path / name).exists())

    def _existing_set(self) -> tuple[str, tuple[str, ...]] | None:
        """``(what it is, its entries)`` of the complete set at the output, or None if the
        ``manifest.json`` there is not one of this tool's."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        entries = set_entries(manifest) if isinstance(manifest, dict) else None
        if entries is None:
            return None
        owner = manifest.get("owner") or {}
        kind = owner.get("job") or {PREPARED_SET: "prepared set", FAKE_BUFFER: "fake-sample buffer"}.get(
            manifest.get("kind"), self.job)
        return kind, entries

    def _clear_leftover(self, staging: Path) -> None:
        """A staging folder left by a run that died: finish its swap if it had started, else remove
        it; only if it carries our marker (an empty one has nothing to lose)."""
        marker = read_marker(staging)
        if marker is None:
            try:
                staging.rmdir()  # empty: a run that died before writing its marker
            except OSError:
                pass  # not ours: reported as foreign
            return
        what = f"{marker.get('job', 'a data job')} run {marker.get('run_id')} (pid {marker.get('pid')} on " \
               f"{marker.get('host')})"
        if marker.get("state") == COMMITTING:
            log.warning("%s: %s was interrupted while swapping in its complete set; finishing that swap",
                        self.job, what)
            swap_in(self.path, staging, marker.get("entries", []), marker.get("replaces", []))
        else:
            log.warning("%s: removing %s, the staging folder of an interrupted %s (nothing outside it was changed)",
                        self.job, staging.name, what)
        shutil.rmtree(staging)

    def _write_marker(self, state: str, **extra: Any) -> None:
        write_json_atomic(self.staging / MARKER, {
            "tool": TOOL, "job": self.job, "run_id": self.run_id, "output": str(self.path.resolve()),
            "pid": os.getpid(), "host": socket.gethostname(), "created_at": _now(), "state": state, **extra,
        })
        self._state = state


def swap_in(output: Path, staging: Path, entries: Iterable[str], replaces: Iterable[str]) -> None:
    """Replace the complete set at ``output`` (entries ``replaces``) by the one in
    ``staging/set`` (``entries`` and its manifest), the manifest last.

    Idempotent, so an interrupted swap is finished by calling it again: while ``set/manifest.json``
    exists the new set is not yet in, so whatever of ``replaces`` is still at ``output`` where
    ``set/`` has that entry too is the old one; once the manifest is moved it is done.
    """
    new, old = staging / NEW, staging / OLD
    if not (new / MANIFEST).exists():
        return
    entries = list(entries)
    old.mkdir(exist_ok=True)
    if (output / MANIFEST).exists():
        _move(output / MANIFEST, old / MANIFEST)  # from here the old set no longer looks complete
    for name in replaces:
        if (output / name).exists() and ((new / name).exists() or name not in entries):
            _move(output / name, old / name)
    for name in entries:
        if (new / name).exists():
            if (output / name).exists():
                raise OutputError(f"cannot swap the new set into {str(output)!r}: {name} is in the way; the new set "
                                  f"is complete in {str(new)!r}")
            _move(new / name, output / name)
    _move(new / MANIFEST, output / MANIFEST)
    _fsync_dir(output)


def _move(source: Path, target: Path) -> None:
    os.replace(source, target)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
