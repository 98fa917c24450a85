"""Local paths and ``gs://`` (or any fsspec URL) behind one small API.

We use fsspec/gcsfs rather than Beam's ``FileSystems``: Beam's GCS filesystem insists on Google
credentials and cannot talk to a local GCS emulator, while gcsfs honours ``STORAGE_EMULATOR_HOST``.
Local paths stay plain paths (no ``file://``) in everything we record.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

_LOCAL_PROTOCOLS = ("file", "local")


@dataclass(frozen=True)
class FileInfo:
    """A listed file: its URI, size in bytes and a cheap change signal (generation / mtime)."""

    uri: str
    size: int
    version: str


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    return fsspec.core.url_to_fs(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (``file://`` dropped), so that it names the same file from any
    working directory; any other URI as it is."""
    return os.path.abspath(uri.removeprefix("file://")) if is_local(uri) else uri


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turns an fsspec path back into the URI users see (``gs://b/x.jpg`` or ``/data/x.jpg``)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if any(p in _LOCAL_PROTOCOLS for p in protocols):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def extension(uri: str) -> str:
    """The lower-case extension of the last part of ``uri`` (``".jpg"``; ``""`` when it has none)."""
    return posixpath.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[1].lower()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def open_file(uri: str, mode: str = "rb") -> IO:
    fs, path = filesystem(uri)
    return fs.open(path, mode)


class ReadTimeout(TimeoutError):
    """A read that did not complete within its time (``--read-timeout``)."""


def _special_kind(path: str) -> str | None:
    """What a local path is when it is not a regular file (``"FIFO"``, ``"socket"``, ...), else
    None. Opening a named pipe blocks until someone writes to it, so such paths are never read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing or unreadable: the read says why
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return kind
    return "special file"


def _read_whole(uri: str) -> bytes:
    fs, path = filesystem(uri)
    if is_local(uri) and (kind := _special_kind(path)) is not None:
        raise OSError(f"{uri} is not a regular file (a {kind}); only regular files are read")
    return fs.cat_file(path)


#: Reads abandoned after their timeout that have not returned yet, in this process; once there
#: are this many, a read fails at once rather than adding one more stalled thread (a dead mount
#: then makes error rows quickly, and the threads stay bounded).
MAX_STALLED_READS = 32
_stalled_lock = threading.Lock()
_stalled = [0]


def stalled_reads() -> int:
    """Abandoned reads (:func:`read_bytes` past its timeout) that have not returned yet."""
    return _stalled[0]


def read_bytes(uri: str, *, timeout: float | None = None) -> bytes:
    """The content of a regular file (a local named pipe, socket or device is refused rather than
    read: opening a pipe blocks forever).

    Args:
        timeout: seconds the read may take; past them :class:`ReadTimeout` is raised and the read
            is abandoned to a daemon thread (a stalled mount or connection cannot be cancelled,
            but it no longer holds the caller, nor the process's exit).
    """
    if timeout is None:
        return _read_whole(uri)
    with _stalled_lock:
        if _stalled[0] >= MAX_STALLED_READS:
            raise ReadTimeout(
                f"not read: {_stalled[0]} earlier reads of this process are still stalled past "
                "--read-timeout (the storage is not answering)"
            )
    done = threading.Event()
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            outcome["data"] = _read_whole(uri)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc
        finally:
            with _stalled_lock:
                done.set()
                if outcome.get("abandoned"):
                    _stalled[0] -= 1

    threading.Thread(target=read, name="read", daemon=True).start()
    if not done.wait(timeout):
        with _stalled_lock:
            if not done.is_set():  # still reading: abandoned to its thread
                outcome["abandoned"] = True
                _stalled[0] += 1
                raise ReadTimeout(f"no complete read within {timeout:g} s (--read-timeout)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def remove_if_empty(uri: str) -> None:
    """Removes a local folder that holds no file (empty folders inside it go too); object
    stores have no empty folders, so there is nothing to do there."""
    if not is_local(uri):
        return
    fs, path = filesystem(uri)
    if fs.exists(path) and fs.isdir(path) and not fs.find(path):
        fs.rm(path, recursive=True)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def _info(fs: fsspec.AbstractFileSystem, path: str, detail: dict) -> FileInfo:
    version = detail.get("generation") or detail.get("etag") or detail.get("mtime") or ""
    if hasattr(version, "isoformat"):
        version = version.isoformat()
    return FileInfo(uri=to_uri(fs, path), size=int(detail.get("size") or 0), version=str(version))


def _followed(fs: fsspec.AbstractFileSystem, path: str, detail: dict) -> dict:
    """A local listing entry with its symbolic link followed. fsspec describes a link itself
    (type ``other``, the link's own size and mtime); a link to a regular file is that file (its
    size and mtime are the change signal), and a dangling link a file whose read will say why it
    fails (an error row, not a silent skip). A link to a folder is not followed (fsspec's walk
    does not follow them, which keeps a link cycle from running forever): it stays ``other``, so
    it is counted with the skipped files rather than left out without a word."""
    if not (detail.get("islink") and isinstance(fs, LocalFileSystem)):
        return detail
    try:
        st = os.stat(path)
    except OSError:
        return {**detail, "type": "file"}
    if stat.S_ISREG(st.st_mode):
        return {**detail, "type": "file", "size": st.st_size, "mtime": st.st_mtime}
    return detail


def _regular(
    fs: fsspec.AbstractFileSystem, found: dict, others: list[str] | None
) -> list[FileInfo]:
    """The regular files of a listing (symbolic links followed), sorted by URI; the URIs of the
    rest that are not folders (named pipes, sockets, devices: fsspec's ``other``) go to
    ``others``."""
    files = []
    for p, d in found.items():
        d = _followed(fs, p, d)
        kind = d.get("type")
        if kind == "file":
            files.append(_info(fs, p, d))
        elif kind != "directory" and others is not None:
            others.append(to_uri(fs, p))
    if others is not None:
        others.sort()
    return sorted(files, key=lambda f: f.uri)


def find_files(root: str, *, others: list[str] | None = None) -> list[FileInfo]:
    """Every regular file below ``root``, recursively, sorted by URI; anything else that is not a
    folder (a named pipe, a socket, a device) is left out, and its URI added to ``others``."""
    fs, path = filesystem(root)
    return _regular(fs, fs.find(path, detail=True), others)


def glob_files(pattern: str, *, others: list[str] | None = None) -> list[FileInfo]:
    """Regular files matching a glob (``**`` recurses), sorted by URI; other matches that are not
    folders go to ``others``, as in :func:`find_files`."""
    fs, path = filesystem(pattern)
    return _regular(fs, fs.glob(path, detail=True), others)


def is_regular_file(uri: str) -> bool:
    """Whether ``uri`` is a regular file, or a link to one (object-store objects always are)."""
    fs, path = filesystem(uri)
    return _followed(fs, path, fs.info(path)).get("type") == "file"


def file_info(uri: str) -> FileInfo:
    fs, path = filesystem(uri)
    return _info(fs, path, _followed(fs, path, fs.info(path)))


def write_atomically(uri: str, write: Callable[[IO], None]) -> None:
    """Writes a file so that readers never see it half-written.

    Local files are written under a temporary name in the same folder and renamed (atomic on one
    filesystem). Object stores (GCS, S3) publish an object only when its upload completes, so we
    write there directly: a copy-then-delete rename would cost a second upload and, on GCS
    emulators, a slow failed ``moveTo`` retry loop.
    """
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    if not is_local(uri):
        with fs.open(path, "wb") as f:
            write(f)
        return
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def local_copy(uri: str, cache_dir: str) -> str:
    """A local path to ``uri``'s content, downloading remote files (or a folder's files, e.g. a
    KerasHub preset) once into ``cache_dir``."""
    if is_local(uri):
        return uri.removeprefix("file://")
    if is_dir(uri):
        return _local_dir_copy(uri, cache_dir)
    info = file_info(uri)
    key = hashlib.sha256(f"{info.uri}|{info.size}|{info.version}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, f"{key}-{posixpath.basename(uri)}")
    if not os.path.exists(target):
        os.makedirs(cache_dir, exist_ok=True)
        data = read_bytes(uri)
        write_atomically(target, lambda f: f.write(data))
    return target


def _local_dir_copy(uri: str, cache_dir: str) -> str:
    files = find_files(uri)
    state = "|".join(f"{f.uri}:{f.size}:{f.version}" for f in files)
    key = hashlib.sha256(f"{uri}|{state}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, f"{key}-{posixpath.basename(uri.rstrip('/'))}")
    root = uri.rstrip("/")
    for info in files:
        local = os.path.join(target, *info.uri[len(root) + 1 :].split("/"))
        if not os.path.exists(local):
            data = read_bytes(info.uri)
            write_atomically(local, lambda f, data=data: f.write(data))
    return target


# --- job outputs: refuse a used one unless --overwrite; replace it only once the new one is whole ---


def holds_results(uri: str) -> bool:
    """Whether ``uri`` is a file, or a folder with at least one file below it."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return False
    if not fs.isdir(path):
        return True
    return any(d.get("type") != "directory" for d in fs.find(path, detail=True).values())


def check_output(uri: str, *, overwrite: bool, flag: str, what: str = "folder") -> None:
    """Refuses an output (a ``what``: folder or file) that already holds results unless
    ``overwrite``.

    Raises:
        FileExistsError: one line naming the output and the two ways on.
    """
    if not overwrite and holds_results(uri):
        raise FileExistsError(
            f"{flag} {uri} already holds results; pass --overwrite to replace them, or choose "
            f"another {what}"
        )


@contextlib.contextmanager
def staged_output(uri: str, *, overwrite: bool, flag: str) -> Iterator[str]:
    """The one rule for a job's output folder: refused when it holds results unless
    ``overwrite`` (:func:`check_output`); the job writes into the staging folder this yields
    (beside ``uri``); when the block ends without error the staging folder replaces ``uri`` (the
    old results are removed only then), and on an error it is removed and ``uri`` is untouched.

    Locally the swap is two renames; on an object store (``gs://``, no folder rename) each staged
    object is moved into place, then the old objects the new result does not hold are removed.
    """
    check_output(uri, overwrite=overwrite, flag=flag)
    fs, path = filesystem(uri)
    path = path.rstrip("/")
    tag = uuid.uuid4().hex[:12]
    parent, name = posixpath.split(path) if not is_local(uri) else os.path.split(path)
    staging = (
        posixpath.join(parent, f"{name}.staging-{tag}")
        if not is_local(uri)
        else os.path.join(parent, f".{name}.staging-{tag}")
    )
    fs.makedirs(staging, exist_ok=True)
    try:
        yield to_uri(fs, staging)
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    if is_local(uri):
        _swap_local(path, staging, tag)
    else:
        _swap_remote(fs, path, staging)


def _swap_local(path: str, staging: str, tag: str) -> None:
    old = None
    if os.path.lexists(path):
        old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{tag}")
        os.rename(path, old)
    os.rename(staging, path)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


def _swap_remote(fs: fsspec.AbstractFileSystem, path: str, staging: str) -> None:
    old = [
        to_uri(fs, p) for p, d in fs.find(path, detail=True).items() if d.get("type") != "directory"
    ]
    swap_in(to_uri(fs, path), to_uri(fs, staging), replaces=old)


def move_in(target: str, staging: str) -> list[str]:
    """Moves (on an object store: copies, server-side) every file below ``staging`` to the same
    place below ``target``; returns the new files' URIs. Files already moved are not there to
    move again, so a retry finishes what an earlier attempt began."""
    fs, path = filesystem(target)
    _, staged_root = filesystem(staging)
    path, staged_root = path.rstrip("/"), staged_root.rstrip("/")
    moved = []
    if not fs.exists(staged_root):
        return moved
    for staged in sorted(fs.find(staged_root)):
        dest = path + staged[len(staged_root) :]
        if is_local(target):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(staged, dest)
        else:  # a server-side copy (rewrite); the staged objects are removed with their folder
            fs.copy(staged, dest)
        moved.append(to_uri(fs, dest))
    return moved


def swap_in(target: str, staging: str, *, replaces: Iterable[str]) -> list[str]:
    """Moves every file below ``staging`` to the same place below ``target`` (:func:`move_in`),
    then removes the ``replaces`` files that no new file took the place of, then the staging
    folder; returns the new files' URIs.

    The old files stay whole and readable until every new file is in place (for a moment, both
    are there). This is the swap of :func:`staged_output` on an object store.
    """
    fs, _ = filesystem(target)
    moved = move_in(target, staging)
    stale = sorted({filesystem(uri)[1] for uri in replaces} - {filesystem(u)[1] for u in moved})
    if stale:
        fs.rm(stale)
    _, staged_root = filesystem(staging)
    if fs.exists(staged_root):
        fs.rm(staged_root, recursive=True)
    return moved
