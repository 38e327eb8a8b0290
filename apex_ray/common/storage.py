"""Where a run reads and writes: local folders, shared mounts and object stores, through one
interface.

A location is either a local path (``runs/apex``, ``/mnt/efs/runs``, ``~/data``) or a URI that
pyarrow's filesystems open (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``).
Local paths are made absolute; URIs are kept verbatim (``Path.resolve`` would turn
``s3://b/x`` into ``<cwd>/s3:/b/x``). Credentials and endpoints come from each store's standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``...),
as for the AWS CLI, so one URI means the same thing on every node.
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    """``s3://...``, ``gs://...`` and the like (not a local path, not ``file://``)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def resolve(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI unchanged."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location / part / ...`` for both kinds (URIs join with ``/``)."""
    text = str(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text).joinpath(*parts))


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds ``location`` and the path inside it."""
    text = resolve(location)
    if is_uri(text):
        try:
            return pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise StorageError(f"cannot open {text!r}: {err}") from None
    return pafs.LocalFileSystem(), text


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` inside ``fs`` as :func:`filesystem` takes it back (Ray Train's
    ``Checkpoint.path`` drops an object store's scheme: ``bucket/runs/...``)."""
    scheme = {"s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://"}.get(fs.type_name)
    return f"{scheme}{path}" if scheme else path


class StorageError(OSError):
    """A location cannot be opened or read; the message names it."""


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def size(location: str | os.PathLike) -> int | None:
    """Bytes of the file at ``location``; None when there is none."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def list_dir(location: str | os.PathLike) -> list[str]:
    """Names directly inside the folder ``location`` (empty when it does not exist)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(info.path.rstrip("/"))
                  for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location))


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file. Locally via a temporary name and a rename; an object store makes an
    object visible only when its upload completes, so readers never see part of it."""
    if not is_uri(location):
        from apex_ray.common.files import atomic_path

        target = Path(resolve(location))
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def check_writable(location: str | os.PathLike) -> None:
    """Write and remove a small probe object under ``location``: the bucket exists and the
    credentials may write. Raises ``OSError`` with the store's reason."""
    import uuid

    fs, path = filesystem(location)
    probe = posixpath.join(path, f".apex-ray-write-probe-{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(probe) as stream:
        stream.write(b"probe")
    fs.delete_file(probe)


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy the folder ``local_dir`` to ``location`` (a URI or a local folder)."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


@contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """The folder at ``location`` as a local folder: itself when it is local, else a temporary
    download removed afterwards."""
    if not is_uri(location):
        yield Path(resolve(location))
        return
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location} is not a folder")
    with tempfile.TemporaryDirectory(prefix="apex-ray-download-") as tmp:
        target = Path(tmp) / posixpath.basename(path.rstrip("/"))
        target.mkdir()  # copy_files makes the subfolders, not the destination itself
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield target


@contextmanager
def local_output(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write into that ends up at ``location``: ``location`` itself when it is
    local, else a temporary folder uploaded once the block succeeds (nothing is uploaded on
    failure)."""
    if not is_uri(location):
        yield Path(resolve(location))
        return
    with tempfile.TemporaryDirectory(prefix="apex-ray-upload-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, location)



def cached_copy(location: str | os.PathLike, cache_root: str | os.PathLike = "~/.cache/apex-ray/downloads") -> Path:
    """A local copy of the folder at URI ``location`` for readers that need a real path
    (diffusers ``from_pretrained``), downloaded once per node and reused. A download is renamed
    into place only when complete, so an interrupted one is never taken for a copy."""
    import hashlib
    import uuid

    key = hashlib.sha256(resolve(location).encode()).hexdigest()[:16]
    target = Path(cache_root).expanduser() / f"{posixpath.basename(str(location).rstrip('/'))}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".partial-{uuid.uuid4().hex[:8]}-{target.name}"
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location} is not a folder")
    try:
        partial.mkdir()
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(partial, target)
        except OSError:  # another process on this node finished the same download first
            if not target.is_dir():
                raise
    finally:
        if partial.exists():
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
    return target
