"""The extraction job on a real Dask cluster: a scheduler and 2 worker processes over loopback;
and the same with a worker, or the scheduler, killed mid-run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.extract import run
from pipeline.runners import start_local_dask_cluster
from transforms import table

pytest.importorskip("distributed")

SMALL = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "64"]


@pytest.fixture(scope="module")
def dask_cluster():
    cluster = start_local_dask_cluster(2)
    yield cluster
    cluster.close()


def test_dask_runner_matches_the_direct_runner(image_tree, dask_cluster, tmp_path):
    from fakes import add_bad_files

    add_bad_files(image_tree)
    common = ["--input", str(image_tree), *SMALL, "--chunk-size", "3", "--max-pixels", "4000000"]
    on_dask = run(
        [*common, "--output", str(tmp_path / "dask"), "--runner", "dask"]
        + ["--dask_client_address", dask_cluster.scheduler_address]
    )
    direct = run([*common, "--output", str(tmp_path / "direct")])

    assert (on_dask["inputs"], on_dask["rows"], on_dask["errors"]) == (16, 12, 4)
    assert on_dask["inputs"] == on_dask["rows"] + on_dask["errors"]
    assert len(on_dask["run"]["workers"]) == 2, on_dask["run"]["workers"]
    assert on_dask["run"]["chunks"] == 6
    assert (direct["rows"], direct["errors"]) == (on_dask["rows"], on_dask["errors"])

    def rows(name):
        t = table.read_table(str(tmp_path / name)).sort_by("image_id")
        return t.drop_columns(["feature"]).to_pylist(), table.features_matrix(t)

    dask_rows, dask_vectors = rows("dask")
    direct_rows, direct_vectors = rows("direct")
    assert dask_rows == direct_rows
    assert abs(dask_vectors - direct_vectors).max() < 1e-5
    errors = table.read_table(str(tmp_path / "dask"), prefix=table.ERRORS)
    assert errors.num_rows == 4


# --- Faults: a real scheduler and 2 worker processes, killed mid-run -----------------------------


class _Cluster:
    """``dask scheduler`` and ``dask worker`` processes (no nanny) on loopback, each its own
    process group so that one can be killed; :meth:`close` kills whatever is left."""

    def __init__(self, tmp_path):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs = tmp_path
        self.scheduler = None
        self.workers: list = []

    def _start(self, *args):
        name = self.logs / f"dask-{time.monotonic_ns()}.log"
        with open(name, "w") as log:  # the process keeps its own copy of the descriptor
            return subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "dask"), *args],
                env=dict(os.environ, DASK_LOGGING__DISTRIBUTED="warning"),
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    def start_scheduler(self):
        self.scheduler = self._start(
            "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"
        )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            assert self.scheduler.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)

    def start_workers(self, n=2):
        for _ in range(n):
            self.workers.append(
                self._start(
                    "worker",
                    self.address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                )  # fmt: skip
            )

    def kill(self, proc):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self):
        for proc in [self.scheduler, *self.workers]:
            if proc is not None and proc.poll() is None:
                self.kill(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def processes(tmp_path):
    cluster = _Cluster(tmp_path)
    try:
        cluster.start_scheduler()
        cluster.start_workers()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    from conftest import write_image_tree

    images = tmp_path_factory.mktemp("many") / "images"
    write_image_tree(images, per_class=10, size=(64, 48))  # 40 images, 20 chunks of 2
    return images


def _argv(images, out, address):
    return ["--input", str(images), "--output", str(out), *SMALL, "--chunk-size", "2"] + [
        "--runner", "dask", "--dask_client_address", address,
    ]  # fmt: skip


def _kill_mid_run(argv, out, kill, timeout=150):
    """Runs ``python -m pipeline.extract argv``; once a shard is committed and not every one,
    calls ``kill()``; returns the exit status, stderr and seconds from the kill to the end."""
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline.extract", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not table.shard_files(str(out)):
            assert job.poll() is None, job.communicate()[1]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.02)
        assert len(table.shard_files(str(out))) < 20, "the run ended before the kill"
        kill()
        killed = time.monotonic()
        _, err = job.communicate(timeout=timeout)  # never a hang
        return job.returncode, err, time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()


def _assert_each_image_once(images, out, direct):
    from transforms import listing

    t = table.read_table(str(out)).sort_by("image_id")
    ids = t.column("image_id").to_pylist()
    expected = sorted(r.image_id for r in listing.list_sources([str(images)]))
    assert ids == expected  # every image, each once (none failed)
    assert abs(table.features_matrix(t) - direct).max() < 1e-5
    assert table.read_summary(str(out))["inputs"] == len(expected)
    assert not (out / "_LEASE.json").exists() and not (out / "_plans").exists()


@pytest.fixture(scope="module")
def direct_vectors(many_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("direct") / "t"
    run(["--input", str(many_images), "--output", str(out), *SMALL, "--chunk-size", "2"])
    return table.features_matrix(table.read_table(str(out)).sort_by("image_id"))


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_survived(processes, many_images, direct_vectors, tmp_path):
    out = tmp_path / "t"
    argv = _argv(many_images, out, processes.address)
    status, err, seconds = _kill_mid_run(argv, out, lambda: processes.kill(processes.workers[0]))
    print(f"worker killed: the run ended {seconds:.1f} s later")
    assert status == 0, err  # the scheduler ran the lost worker's chunks on the other one
    _assert_each_image_once(many_images, out, direct_vectors)


@pytest.mark.slow
def test_a_scheduler_killed_mid_run_fails_clearly_and_the_rerun_resumes(
    processes, many_images, direct_vectors, tmp_path
):
    out = tmp_path / "t"
    argv = _argv(many_images, out, processes.address)
    status, err, seconds = _kill_mid_run(argv, out, lambda: processes.kill(processes.scheduler))
    print(f"scheduler killed: the run failed {seconds:.1f} s later")
    assert status == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: lost the Dask scheduler at {processes.address} mid-run"), err
    assert "--mode incremental" in last and "Traceback" not in err
    assert not (out / "_LEASE.json").exists()  # given back
    assert not (out / "_plans").exists()  # the failed run's plan removed
    committed = len(table.shard_files(str(out)))
    assert 0 < committed < 20

    # The scheduler is restarted at the same address; its workers stopped with it, new ones join.
    for worker in processes.workers:
        worker.wait(timeout=60)
    processes.workers.clear()
    processes.start_scheduler()
    processes.start_workers()
    started = time.monotonic()
    summary = run([*argv, "--mode", "incremental"])
    print(f"rerun on the restarted cluster: {time.monotonic() - started:.1f} s")
    assert summary["run"]["embedded"] == 40 - 2 * committed
    _assert_each_image_once(many_images, out, direct_vectors)
