"""One writer per table: a lease file in the output folder.

A run takes the lease (``OUT/_LEASE.json``: run id, host, pid, when) before it plans, and gives it
back when it ends. The lease is created atomically: an exclusive create on a local disk, and an
``ifGenerationMatch=0`` precondition on GCS. A second run on the same table fails fast, naming the
holder and how long ago it was last renewed.

A live run renews a heartbeat (``OUT/_LEASE.RUN.heartbeat``, one object per run, so renewals never
race with another run's writes): the launcher every ``expiry/4`` seconds while it waits for the
pipeline, and the workers as they embed (a Dataflow flex-template launcher exits after
submitting). A lease whose newest heartbeat is older than its expiry belongs to a dead run (a
``kill -9``, a lost VM): the next run takes it over with a warning; ``--break-lease`` takes it over
at once. A lease whose holder ran on this same host and whose processes (the lease's pid, and the
pid of its newest heartbeat) are no longer alive is taken over at once too, with a warning saying
so: a run killed with ``kill -9`` on this machine does not block the table for the expiry ("this
host": the same name, boot and pid namespace, so a container that shares the host's name is not
judged from here). Taking over is exclusive too: under an ``flock`` on a local disk, and on GCS by
deleting exactly the dead lease's generation (``ifGenerationMatch``) before creating a new one.

Workers check the lease before they commit a chunk, so a run whose lease was taken over stops
instead of writing next to the new holder. Clocks of the machines involved are assumed to agree
to well within the expiry.

Other object stores (S3, ...) have no create precondition in fsspec: there the lease is checked
and then written, which guards against runs started seconds apart but not against a tie.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from transforms import storage

_LOG = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
#: A lease not renewed for this long belongs to a dead run.
DEFAULT_EXPIRY_S = 900
_GCS_PROTOCOLS = ("gs", "gcs")


class LeaseHeld(RuntimeError):
    """Another live run holds the table's lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run."""


def _is_gcs(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in _GCS_PROTOCOLS for p in protocols)


@dataclasses.dataclass(frozen=True)
class Lease:
    """A run's hold on a table; small and picklable, so workers renew and check it too."""

    output_dir: str
    run_id: str
    expiry_s: float = DEFAULT_EXPIRY_S

    @property
    def uri(self) -> str:
        return storage.join(self.output_dir, LEASE_FILE)

    def heartbeat_uri(self, run_id: str | None = None) -> str:
        return storage.join(self.output_dir, f"_LEASE.{run_id or self.run_id}.heartbeat")

    def renew(self) -> None:
        """Records that this run is alive."""
        beat = json.dumps({"time": time.time(), **_whoami()})
        storage.write_atomically(self.heartbeat_uri(), lambda f: f.write(beat.encode()))

    def renew_if_due(self) -> None:
        """Renews at most every ``expiry/4`` seconds per process (cheap to call per batch)."""
        now = time.monotonic()
        key = (self.output_dir, self.run_id)
        with _RENEWED_LOCK:
            if now - _RENEWED.get(key, float("-inf")) < self.expiry_s / 4:
                return
            _RENEWED[key] = now
        self.renew()

    def check(self) -> None:
        """Raises :class:`LeaseLost` when another run now holds the table."""
        current = read_lease(self.output_dir)
        if current is None or current["run_id"] != self.run_id:
            holder = "nobody" if current is None else describe(current)
            raise LeaseLost(
                f"run {self.run_id} no longer holds the lease on {self.output_dir} "
                f"(now: {holder}); it stops without committing more rows"
            )

    def release(self) -> None:
        """Gives the lease back if this run still holds it (idempotent)."""
        current = read_lease(self.output_dir)
        if current is not None and current["run_id"] == self.run_id:
            fs, path = storage.filesystem(self.uri)
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
        _remove(self.heartbeat_uri())


_RENEWED: dict[tuple[str, str], float] = {}
_RENEWED_LOCK = threading.Lock()


def _remove(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path)


def read_lease(output_dir: str) -> dict[str, Any] | None:
    """The current lease with its ``age_s`` (since its newest heartbeat), or None."""
    uri = storage.join(output_dir, LEASE_FILE)
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache(path)
    try:
        lease = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    if _is_gcs(fs):
        with contextlib.suppress(FileNotFoundError):
            lease["generation"] = str(fs.info(path).get("generation") or "")
    latest = float(lease.get("acquired", 0))
    heartbeat = storage.join(output_dir, f"_LEASE.{lease['run_id']}.heartbeat")
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        beat = json.loads(storage.read_bytes(heartbeat))
        latest = max(latest, float(beat["time"]))
        lease["heartbeat"] = {k: beat.get(k) for k in ("host", "pid", "machine")}
    lease["age_s"] = max(0.0, time.time() - latest)
    return lease


def describe(lease: dict[str, Any]) -> str:
    return (
        f"run {lease['run_id']} on {lease.get('host', '?')} (pid {lease.get('pid', '?')}), "
        f"last renewed {lease['age_s']:.0f} s ago"
    )


def _machine() -> str | None:
    """This kernel's boot and this process's pid namespace (Linux), or None. A host name alone
    does not say that a pid means the same process: containers with the host's network (and so
    its name) and cloned machines share names but not process tables."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _whoami() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine()}


def _pid_gone(pid: Any) -> bool:
    """Whether no process with this pid runs on this host (a pid we cannot signal is alive)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def holder_gone(lease: dict[str, Any]) -> bool:
    """Whether the run holding ``lease`` is known to be dead: it ran on this host (same name,
    same boot, same pid namespace), and neither the lease's process nor the one that wrote its
    newest heartbeat is alive. A holder elsewhere (a Dataflow worker, another machine or
    container), or one that did not record where it ran, is never judged from here: its lease
    expires."""
    here, machine = socket.gethostname(), _machine()
    holders = [lease, *([lease["heartbeat"]] if lease.get("heartbeat") else [])]
    return machine is not None and all(
        h.get("host") == here and h.get("machine") == machine and _pid_gone(h.get("pid"))
        for h in holders
    )


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Creates ``uri`` only if it does not exist; False when it does."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        # Written whole under a private name, then hard-linked into place: link() fails if the
        # name exists, and readers never see a half-written lease.
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        return True
    if _is_gcs(fs):
        try:
            fs.pipe_file(path, data, mode="create")  # ifGenerationMatch=0
        except FileExistsError:  # gcsfs maps HTTP 412 (precondition failed) to this
            return False
        return True
    if fs.exists(path):  # no create precondition in fsspec for this store: check, then write
        return False
    fs.pipe_file(path, data)
    return True


def _take_over(uri: str, dead: dict[str, Any], data: bytes) -> bool:
    """Replaces the dead lease with ours, unless another run got there first."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        import fcntl

        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = read_lease(os.path.dirname(path))
            if current is not None and current["run_id"] != dead["run_id"]:
                return False
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return True
    if _is_gcs(fs) and dead.get("generation"):
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=dead["generation"])
        except (FileExistsError, FileNotFoundError):  # 412 / 404: someone else replaced it
            return False
    else:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    return _create_exclusive(uri, data)


def acquire(
    output_dir: str,
    run_id: str,
    *,
    expiry_s: float = DEFAULT_EXPIRY_S,
    break_lease: bool = False,
) -> Lease:
    """Takes the table's lease for ``run_id``.

    Raises:
        LeaseHeld: a live run holds it (and ``break_lease`` is false).
    """
    if expiry_s <= 0:
        raise ValueError(f"the lease expiry must be > 0 s, got {expiry_s}")
    lease = Lease(output_dir, run_id, expiry_s)
    storage.makedirs(output_dir)
    record = {
        "run_id": run_id,
        **_whoami(),
        "acquired": time.time(),
        "expiry_s": expiry_s,
    }
    data = json.dumps(record).encode()
    for _ in range(5):
        # Read first: a store that ignores the create precondition (the GCS emulator does) still
        # refuses a live lease; the precondition then settles a race between two creators.
        current = read_lease(output_dir)
        if current is None:
            if _create_exclusive(lease.uri, data):
                return lease
            continue  # someone created it meanwhile: look at theirs
        expired = current["age_s"] > float(current.get("expiry_s", expiry_s))
        gone = not (expired or break_lease) and holder_gone(current)
        if not (expired or break_lease or gone):
            raise LeaseHeld(
                f"{output_dir} is being written by {describe(current)}; one run per table at a "
                f"time. Wait for it, or if that run is dead, pass --break-lease (a lease not "
                f"renewed for {float(current.get('expiry_s', expiry_s)):.0f} s is taken over "
                "automatically)"
            )
        if expired:
            why = "lease expired"
        elif gone:
            why = f"its process (pid {current.get('pid')}) is no longer running on this host"
        else:
            why = "lease broken (--break-lease)"
        _LOG.warning("taking over the lease on %s: %s; %s", output_dir, describe(current), why)
        if _take_over(lease.uri, current, data):
            _remove(lease.heartbeat_uri(current["run_id"]))
            return lease
    raise LeaseHeld(f"could not take the lease on {output_dir}: other runs keep taking it")


@contextlib.contextmanager
def holding(lease: Lease, *, release: bool = True):
    """Renews ``lease`` in a background thread until the block ends, then releases it; with
    ``release=False`` only if the block fails (a run handed over to workers that renew and
    release it themselves: a flex-template launch)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(lease.expiry_s / 4):
            try:
                lease.renew()
            except Exception as exc:  # a missed heartbeat is not fatal; the next may succeed
                _LOG.warning("could not renew the lease on %s: %s", lease.output_dir, exc)

    lease.renew()
    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    done = False
    try:
        yield lease
        done = True
    finally:
        stop.set()
        thread.join(timeout=5)
        if release or not done:
            lease.release()
