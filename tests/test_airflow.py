"""deploy/schedule/airflow_dag.py under a real Airflow 3, in its own virtual environment.

Airflow is no dependency of this project: the test makes a separate venv with ``apache-airflow``
(cached outside the repository, in ``$FEATUREBEAM_TEST_CACHE`` or ``~/.cache/featurebeam-tests``;
a venv is used only once its install finished), and skips, saying why, where it cannot be
installed. The DAG's tasks call our command line, so Airflow and featurebeam never share an
environment here either.

``airflow dags test`` runs the local target for three consecutive logical dates over a folder that
changes between them; the second date's embedding is killed mid-run (SIGTERM, then SIGKILL) and
Airflow's own retry finishes it. After each date the table equals a fresh full run's. The Dataflow
target's launch parameters are checked against the flex template's metadata without Airflow, and
the DAG file is parsed by Airflow with the Google provider where that provider installs.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

import numpy as np
import pytest
from conftest import encode, gradient, write_image_tree

REPO = pathlib.Path(__file__).resolve().parent.parent
DAG_FILE = REPO / "deploy" / "schedule" / "airflow_dag.py"
METADATA = REPO / "deploy" / "dataflow" / "metadata.json"
AIRFLOW_VERSION = "3.3.2"
DAG_ID = "featurebeam_nightly_embedding"
RECIPE = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "32"]
# Small chunks, one image per model call: many commits, so a kill lands between two of them.
SLOW = ["--chunk-size", "1", "--batch-size", "1", "-q"]
DATES = ["2026-02-01", "2026-02-02", "2026-02-03"]
# Pipeline options of Beam and Dataflow themselves, which a flex template takes as parameters
# without their being declared in its metadata.
DATAFLOW_OWN = {"sdk_container_image", "number_of_worker_harness_threads"}


def dag_constant(name: str):
    """A literal module-level constant of the DAG file, read without importing Airflow."""
    for node in ast.parse(DAG_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {DAG_FILE}")


def test_dataflow_parameters_are_the_templates():
    """Every parameter the Dataflow target launches with is declared in deploy/dataflow/metadata.json
    (or is one of Dataflow's own options, known to Beam), and every literal value matches the
    parameter's regexes; a templated value reads an Airflow Variable when the task runs."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parameters = dag_constant("DATAFLOW_PARAMETERS")
    declared = {p["name"]: p for p in json.loads(METADATA.read_text())["parameters"]}
    for name, value in parameters.items():
        assert isinstance(value, str), f"{name}: the launch API takes strings, not {value!r}"
        if name in DATAFLOW_OWN:
            known = PipelineOptions([f"--{name}=1"]).get_all_options(retain_unknown_options=True)
            assert name in known and known[name] is not None
            continue
        assert name in declared, f"{name} is not a parameter of {METADATA}"
        if "{{" in value:
            assert re.fullmatch(
                r"\{\{ var\.value\.get\('featurebeam_\w+'(, '[^']*')?\) \}\}", value
            )
            continue
        for regex in declared[name].get("regexes", []):
            assert re.search(regex, value), f"{name}={value!r} does not match {regex}"
    assert parameters["mode"] == "incremental"
    for name, spec in declared.items():
        if not spec.get("isOptional", True):
            assert name in parameters, f"required template parameter {name} is not passed"
    # Once the template takes prune (a "true"/"false" string), the schedule must pass it.
    if "prune" in declared:
        assert "prune" in parameters


def test_the_dag_reads_no_variable_at_parse_time():
    """Variables are read by templates when a task runs: parsing the file asks the database
    nothing (a scheduler parses it every few seconds)."""
    tree = ast.parse(DAG_FILE.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "Variable" not in names | imported


# --- the real Airflow -------------------------------------------------------------------------


def cache_root() -> pathlib.Path:
    base = os.environ.get("FEATUREBEAM_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featurebeam-tests"
    )
    return pathlib.Path(base)


def base_python() -> str:
    """The interpreter this venv was made from (a venv inside a venv would share nothing, but the
    system one is what a user would use)."""
    candidate = pathlib.Path(sys.base_prefix) / "bin" / f"python{sysconfig.get_python_version()}"
    return str(candidate) if candidate.exists() else sys.executable


def airflow_venv(name: str, packages: list[str]) -> pathlib.Path:
    """A venv with ``packages`` under the cache, made once (under a file lock) and reused; a venv
    whose install did not finish is made again. Skips with pip's last line when pip fails."""
    py = sysconfig.get_python_version()
    venv = cache_root() / f"{name}-{AIRFLOW_VERSION}-py{py}"
    marker = venv / ".featurebeam-installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        steps = [
            [base_python(), "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--quiet", *packages],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                lines = [
                    line
                    for line in (done.stderr or done.stdout).splitlines()
                    if line.strip() and not line.startswith("WARNING: Location")
                ]
                pytest.skip(f"cannot install {' '.join(packages)}: {lines[-1] if lines else '?'}")
        marker.write_text(f"{' '.join(packages)}\n{time.monotonic() - started:.0f} s\n")
        print(f"\n{venv}: installed in {time.monotonic() - started:.0f} s")
    return venv


@pytest.fixture(scope="session")
def airflow(tmp_path_factory):
    """``(run, home)``: ``run(args, **env)`` runs the ``airflow`` command of a fresh AIRFLOW_HOME
    (sqlite, migrated once) whose DAG folder is deploy/schedule."""
    venv = airflow_venv("airflow", [f"apache-airflow=={AIRFLOW_VERSION}"])
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": "",
    }
    env.pop("VIRTUAL_ENV", None)

    def run(args, *, timeout=600, **extra):
        return subprocess.Popen(
            [str(venv / "bin" / "airflow"), *args],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    migrate = run(["db", "migrate"])
    out, _ = migrate.communicate(timeout=300)
    assert migrate.returncode == 0, out[-3000:]
    return run


def featurebeam_command(folder: pathlib.Path) -> str:
    """``featurebeam`` as this checkout's code (the venv's entry point may import another one)."""
    script = folder / "featurebeam"
    script.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m pipeline.console "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


def extract_processes(out: pathlib.Path) -> list[int]:
    """Live ``featurebeam extract`` processes writing ``out``."""
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
            ours = b"pipeline.console" in argv and b"extract" in argv and str(out).encode() in argv
            if ours and stat.rsplit(")", 1)[1].split()[0] != "Z":  # not a zombie
                pids.append(int(proc.name))
    return pids


class Watch(threading.Thread):
    """Follows the extract processes of one date: when each started and ended; with ``kill``,
    SIGTERMs the first one once it has committed a shard of its own (mid-run), and SIGKILLs what
    is left of its process group shortly after."""

    def __init__(self, out: pathlib.Path, *, kill: bool):
        super().__init__(daemon=True)
        self.out, self.kill = out, kill
        self.seen: dict[int, list[float]] = {}  # pid -> [start, end]
        self.killed_at = None
        self.shards_at_kill = None
        self.lease_left = None
        self.stop = threading.Event()

    def shards(self) -> set[str]:
        return {p.name for p in self.out.glob("features-*.parquet")}

    def run(self):
        before = self.shards()
        while not self.stop.is_set():
            live = set(extract_processes(self.out))
            now = time.monotonic()
            for pid in live - set(self.seen):
                self.seen[pid] = [now, None]
            for pid, times in self.seen.items():
                if pid not in live and times[1] is None:
                    times[1] = now
            plans = list((self.out / "_plans").glob("plan-*.parquet"))
            armed = self.kill and self.killed_at is None and live and plans
            if armed and self.shards() - before:
                self._kill(min(live))
            time.sleep(0.01)

    def _kill(self, pid: int):
        self.killed_at = time.monotonic()
        self.shards_at_kill = len(self.shards())
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)  # the grace a supervisor gives, short: the group may still be stopping
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # `exec` made the command its group's leader
        deadline = time.monotonic() + 10
        while pid in extract_processes(self.out) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.lease_left = (self.out / "_LEASE.json").exists()

    def tries(self) -> list[tuple[float, float]]:
        return sorted(tuple(t) for t in self.seen.values())


def change_folder(images: pathlib.Path, date: int) -> dict[str, int]:
    """The folder's change before each date; returns what changed."""
    new = images / "train" / "new"
    if date == 1:
        new.mkdir()
        for i in range(40):  # many images, one per chunk: the run to kill lasts a while
            (new / f"{i}.png").write_bytes(encode(gradient(24, 24, seed=100 + i)))
        # The same name, other pixels, the same size on disk: only the mtime says it changed.
        replaced = images / "val" / "dogs" / "0.png"
        stat = replaced.stat()
        replaced.write_bytes(encode(gradient(40, 30, seed=999)))
        os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        (images / "val" / "cats" / "1.jpg").unlink()
        (images / "train" / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
        return {"added": 40, "replaced": 1, "deleted": 1, "corrupt": 1}
    if date == 2:
        for i in range(40, 43):
            (new / f"{i}.png").write_bytes(encode(gradient(24, 24, seed=100 + i)))
        (images / "train" / "cats" / "broken.png").unlink()
        (new / "7.png").unlink()
        return {"added": 3, "deleted": 2}
    return {}


def assert_matches_a_fresh_full_run(images, out, tmp_path, date):
    from pipeline.extract import run
    from transforms import table

    fresh = tmp_path / f"fresh-{date}"
    run(["--input", str(images), "--output", str(fresh), *RECIPE, "-q"])
    got = table.read_table(str(out)).sort_by("image_id")
    want = table.read_table(str(fresh)).sort_by("image_id")
    ids = got.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "an image is in the table twice"
    assert ids == want.column("image_id").to_pylist()
    assert got.column("uri").to_pylist() == want.column("uri").to_pylist()
    np.testing.assert_allclose(
        table.features_matrix(got), table.features_matrix(want), rtol=0, atol=1e-5
    )

    def errors(folder):
        if not table.shard_files(str(folder), table.ERRORS):
            return []
        return sorted(table.read_table(str(folder), prefix=table.ERRORS).column("uri").to_pylist())

    assert errors(out) == errors(fresh)
    listed = sum(1 for p in images.rglob("*") if p.is_file())
    assert len(ids) + len(errors(out)) == listed, "every listed file is a row or an error row"
    return len(ids), errors(out)


@pytest.mark.slow
def test_nightly_dag_three_dates_with_a_killed_try(airflow, tmp_path):
    from transforms.neighbors_layout import NEIGHBORS_FILE

    images = tmp_path / "images"
    write_image_tree(images, per_class=4)
    out, neighbors, report = tmp_path / "table", tmp_path / "neighbors", tmp_path / "report.html"
    index_dir = tmp_path / "index"
    variables = {
        "AIRFLOW_VAR_FEATUREBEAM_COMMAND": featurebeam_command(tmp_path),
        "AIRFLOW_VAR_FEATUREBEAM_INPUT": str(images),
        "AIRFLOW_VAR_FEATUREBEAM_OUTPUT": str(out),
        "AIRFLOW_VAR_FEATUREBEAM_BACKBONE": "mobilenet_v2",
        "AIRFLOW_VAR_FEATUREBEAM_WEIGHTS": "none",
        "AIRFLOW_VAR_FEATUREBEAM_EXTRA_ARGS": " ".join([*RECIPE[4:], *SLOW]),
        "AIRFLOW_VAR_FEATUREBEAM_INDEX": str(index_dir),
        "AIRFLOW_VAR_FEATUREBEAM_NEIGHBORS": str(neighbors),
        "AIRFLOW_VAR_FEATUREBEAM_REPORT": str(report),
        "FEATUREBEAM_RETRIES": "1",
        "FEATUREBEAM_RETRY_DELAY_S": "1",
        "FEATUREBEAM_TIMEOUT_S": "600",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    timings = []
    for index, date in enumerate(DATES):
        changes = change_folder(images, index)
        watch = Watch(out, kill=index == 1)
        watch.start()
        started = time.monotonic()
        dags_test = airflow(["dags", "test", DAG_ID, date], **variables)
        log, _ = dags_test.communicate(timeout=600)
        wall = time.monotonic() - started
        watch.stop.set()
        watch.join()
        (tmp_path / f"airflow-{date}.log").write_text(log)
        assert dags_test.returncode == 0, log[-4000:]
        finished = re.findall(rf"DagRun Finished: dag_id={DAG_ID}.*?state=(\w+)", log)
        assert finished == ["success"], log[-4000:]
        tries = watch.tries()
        rows, errors = assert_matches_a_fresh_full_run(images, out, tmp_path, index)
        assert len(errors) == changes.get("corrupt", 0) and all("broken" in e for e in errors)
        assert not (out / "_LEASE.json").exists() and not list(out.glob("_plans/*"))
        # The refreshed index, neighbours and report cover today's table; the index was updated
        # in place after the first date, not rebuilt.
        import pyarrow.parquet as pq

        from transforms import table
        from transforms.index import SearchIndex

        searchable = SearchIndex.open(str(index_dir))
        assert sorted(searchable.rows.column("image_id").to_pylist()) == sorted(
            table.read_table(str(out), columns=["image_id"]).column("image_id").to_pylist()
        )
        actions = [entry["action"] for entry in searchable.manifest["history"]]
        assert actions == ["built", *["updated"] * index], actions
        assert pq.read_table(neighbors / NEIGHBORS_FILE).num_rows == rows
        assert report.stat().st_size > 0 and report.stat().st_mtime >= time.time() - wall - 1
        # `featurebeam runs OUT` lists one run per try, newest first: the killed try is there,
        # not shown as a success, and nothing is pending once the date's run finished.
        history = json.loads(
            subprocess.run(
                [featurebeam_command(tmp_path), "runs", str(out), "--json", "--limit", "0"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        shown = [r["shown_status"] for r in reversed(history["runs"])]  # oldest first
        killed = ["stopped", "not finished"]  # SIGTERM stopped it, or SIGKILL came first
        want = [["succeeded"], ["succeeded", killed, "succeeded"]][min(index, 1)]
        want = want + ["succeeded"] * (index - 1 if index > 1 else 0)
        assert len(shown) == len(want), shown
        for got, expected in zip(shown, want, strict=True):
            assert got in expected if isinstance(expected, list) else got == expected, shown
        assert history["freshness"]["pending"] == 0, history
        timing = {"date": date, "wall_s": round(wall, 1), "rows": rows, "tries": len(tries)}
        timing["embed_s"] = [round(end - start, 1) for start, end in tries if end]
        if index == 1:
            assert watch.killed_at is not None, "the embedding ended before it could be killed"
            assert len(tries) == 2, f"expected the killed try and Airflow's retry: {tries}"
            assert "up_for_retry" in log
            assert rows > watch.shards_at_kill > 0
            timing["killed_after_s"] = round(watch.killed_at - tries[0][0], 1)
            timing["recovered_s"] = round(tries[1][1] - watch.killed_at, 1)
            timing["lease_left_by_kill"] = watch.lease_left
        else:
            assert len(tries) == 1, tries
        timings.append(timing)
    print("\nairflow dags test per date:", json.dumps(timings, indent=1))
    (tmp_path / "timings.json").write_text(json.dumps(timings))


@pytest.mark.slow
def test_dataflow_target_parses_with_the_google_provider(tmp_path):
    """The Dataflow target, parsed by the same Airflow with the Google (and Beam) providers, which
    the Dataflow operator imports: no import error, the launch body carries the parameters."""
    venv = airflow_venv(
        "airflow-google",
        [
            f"apache-airflow=={AIRFLOW_VERSION}",
            "apache-airflow-providers-google",
            "apache-airflow-providers-apache-beam",
        ],
    )
    probe = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder=sys.argv[1])\n"
        "task = bag.dags[sys.argv[2]].get_task('embed') if not bag.import_errors else None\n"
        "print(json.dumps({'errors': {k: v[-800:] for k, v in bag.import_errors.items()},\n"
        "  'operator': type(task).__name__ if task else None,\n"
        "  'parameters': task.body['launchParameter']['parameters'] if task else None}))\n"
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "FEATUREBEAM_AIRFLOW_TARGET": "dataflow",
        "PYTHONPATH": "",
    }
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe, str(DAG_FILE.parent), DAG_ID],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert parsed["operator"] == "DataflowStartFlexTemplateOperator"
    assert parsed["parameters"] == dag_constant("DATAFLOW_PARAMETERS")
