"""Faults on a real Dask cluster run as a supervised one is: a scheduler and 2 workers each under
its nanny (``dask worker``'s default), separate processes on loopback, and the extraction job as a
third. A worker process killed mid-run is restarted by its nanny and Dask reruns its chunks: the
job completes, every image in the table exactly once, its lease given back and its record
``succeeded``. (Workers without a nanny, and a lost scheduler: ``tests/test_dask.py``.)"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import encode, gradient

from transforms import history, table

pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

IMAGES = 40
SMALL = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "64"]
#: Chunks of 2 images, one image per model call: enough chunks to kill something mid-run.
SLOW = ["--chunk-size", "2", "--batch-size", "1"]
BIN = pathlib.Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1; all killed on exit."""

    def __init__(self, folder: pathlib.Path):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "warning"}

    def _start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "a")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [str(BIN / "dask"), *argv], stdout=log, stderr=log, env=self.env, cwd=self.folder
        )
        self.procs.append(proc)
        return proc

    def start_scheduler(self) -> subprocess.Popen:
        self.scheduler = self._start(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-dashboard",
        )
        return self.scheduler

    def start_workers(self, count: int = 2) -> None:
        self.workers = [
            self._start(
                f"worker{i}",
                "worker",
                f"tcp://{self.address}",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            )
            for i in range(count)
        ]
        self.wait_for_workers(count)

    def wait_for_workers(self, count: int, timeout: float = 90) -> None:
        from distributed import Client

        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, TimeoutError), Client(self.address, timeout=5) as c:
                if len(c.scheduler_info()["workers"]) >= count:
                    return
            assert time.monotonic() < deadline, f"{count} workers did not join in {timeout} s"
            time.sleep(0.5)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.kill()
            proc.wait(10)


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    cluster.start_scheduler()
    try:
        cluster.start_workers(2)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def images(tmp_path) -> pathlib.Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(IMAGES):
        (folder / f"{i:02d}.png").write_bytes(encode(gradient(64, 48, seed=i)))
    return folder


def start_job(images, out, address, *extra) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipeline.extract", "--input", str(images), "--output", str(out)]
    argv += [*SMALL, *SLOW, "--runner", "dask", "--dask_client_address", address, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_shards(out: pathlib.Path, job: subprocess.Popen, count: int, timeout=240) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done = len(list(out.glob("features-*.parquet"))) if out.is_dir() else 0
        if done >= count:
            return done
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, f"{count} shards not written in {timeout} s"
        time.sleep(0.1)


def finish(job: subprocess.Popen, timeout=300) -> tuple[int, str]:
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job did not end within {timeout} s: it hangs") from None
    return job.returncode, output


def check_every_image_once(out, images, tmp_path) -> None:
    """Each image once, no error, the lease and plan gone, and the vectors of a direct run."""
    from pipeline.extract import run

    features = table.read_table(str(out)).sort_by("uri")
    ids = features.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == IMAGES
    assert not list(out.glob("_LEASE*")), sorted(p.name for p in out.iterdir())
    assert not list((out / "_plans").glob("*")) if (out / "_plans").exists() else True
    direct = tmp_path / "direct"
    run(["--input", str(images), "--output", str(direct), "-q", *SMALL])
    want = table.read_table(str(direct)).sort_by("uri")
    assert features.column("uri").to_pylist() == want.column("uri").to_pylist()
    gap = np.abs(table.features_matrix(features) - table.features_matrix(want)).max()
    assert gap < 1e-5


def records(out) -> list[dict]:
    """The run records, oldest first."""
    return list(reversed(history.read_records(str(out))))


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_rescheduled_and_the_job_completes(cluster, images, tmp_path):
    out = tmp_path / "out"
    job = start_job(images, out, cluster.address)
    done = wait_for_shards(out, job, 3)
    assert done < IMAGES // 2, "the run ended before the worker could be killed mid-run"
    nanny = psutil.Process(cluster.workers[0].pid)
    (worker,) = [  # the worker process the nanny spawned (not multiprocessing's resource tracker)
        c for c in nanny.children() if "resource_tracker" not in " ".join(c.cmdline())
    ]
    started = time.monotonic()
    worker.kill()  # SIGKILL: the worker process dies with its running task; the nanny stays
    status, output = finish(job)
    recovered = time.monotonic() - started
    assert status == 0, output
    check_every_image_once(out, images, tmp_path)
    assert [r["status"] for r in records(out)] == ["succeeded"]
    print(f"worker killed after {done} shards: the job completed {recovered:.1f} s later")
