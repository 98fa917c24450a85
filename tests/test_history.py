"""A table's run history (``transforms.history``, ``OUT/_RUNS/``) and ``featurebeam runs``: real
runs on the fake backbone leave a record each (succeeded, failed, stopped, or killed: not
finished with its last heartbeat), and the command shows them newest first with the table's
freshness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import apache_beam as beam
import pytest
from conftest import encode, gradient, local_pipeline
from fakes import MeanColorHandler, run_table

from pipeline import cli, launch
from pipeline import runs as runs_job
from transforms import history, table
from transforms import lease as leases
from transforms.table_job import run_metadata


def _records(out):
    return history.read_records(str(out))


def _add_images(root, n, *, seed=100):
    for i in range(n):
        (root / "train" / "cats" / f"new{seed + i}.png").write_bytes(
            encode(gradient(16, 16, seed=seed + i), "PNG")
        )


def _launch_failing(images, out, fail):
    """A real launch whose graph raises ``fail`` in a step."""

    def boom(_):
        raise fail

    return launch.launch(
        launch.TableRun(inputs=(str(images),), output=str(out)),
        metadata=run_metadata(MeanColorHandler()),
        build=lambda p, run, held: p | beam.Create([1]) | beam.Map(boom),
        beam_args=[],
        test_pipeline=local_pipeline(),
        command="extract",
    )


def test_a_successful_incremental_run_records_its_counts(image_tree, tmp_path):
    out = tmp_path / "t"
    first = run_table(image_tree, out, chunk_size=5)
    _add_images(image_tree, 2)
    second = run_table(image_tree, out, mode="incremental", chunk_size=5)
    newest, oldest = _records(out)
    assert (
        newest["run_id"] == second["run"]["run_id"] and oldest["run_id"] == first["run"]["run_id"]
    )
    assert newest["status"] == oldest["status"] == history.SUCCEEDED
    assert newest["counts"] == {
        "listed": 14,
        "to_embed": 2,
        "embedded": 2,
        "kept": 12,
        "removed": 0,
        "errors": 0,
        "new_errors": 0,
        "skipped": 0,
    }
    assert oldest["counts"]["embedded"] == 12 and oldest["counts"]["kept"] == 0
    assert newest["mode"] == "incremental" and newest["inputs"] == [str(image_tree)]
    assert newest["recipe"]["backbone"] == "mean_color" and len(newest["recipe"]["fingerprint"])
    assert newest["tool_version"] and newest["runner"] == "direct"
    assert newest["host"] and newest["pid"] == os.getpid()
    assert newest["started"] <= newest["ended"] and newest["reason"] is None


def test_the_last_step_marks_success_on_the_worker_when_the_launcher_does_not(
    image_tree, tmp_path, monkeypatch
):
    """A launcher that exits once the job is submitted (a Dataflow flex template) never writes
    the end of the record: the pipeline's last step does."""
    shim = types.SimpleNamespace(**vars(history))
    shim.succeeded = lambda *a, **k: None
    monkeypatch.setattr(launch, "history", shim)
    out = tmp_path / "t"
    run_table(image_tree, out)
    (record,) = _records(out)
    assert record["status"] == history.SUCCEEDED and record["counts"]["embedded"] == 12


def test_a_failed_run_is_recorded_with_its_reason(image_tree, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(Exception, match="the disk is on fire"):
        _launch_failing(image_tree, out, OSError("the disk is on fire"))
    (record,) = _records(out)
    assert record["status"] == history.FAILED and record["ended"]
    assert "the disk is on fire" in record["reason"] and "\n" not in record["reason"]
    assert record["command"] == "extract" and record["counts"]["to_embed"] == 12
    assert record["counts"]["embedded"] is None


def test_a_stopped_run_is_recorded_stopped(image_tree, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(BaseException):  # noqa: B017 (Beam re-raises what a step raised)
        _launch_failing(image_tree, out, cli.Stopped(signal.SIGTERM))
    (record,) = _records(out)
    assert record["status"] == history.STOPPED and record["reason"] == "stopped by SIGTERM"


def test_a_failure_to_record_never_hides_why_the_run_ended(image_tree, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("the history cannot be written")

    monkeypatch.setattr(history, "ended", broken)
    with pytest.raises(Exception, match="the real reason"):
        _launch_failing(image_tree, tmp_path / "t", ValueError("the real reason"))


def test_a_refused_run_leaves_no_record(image_tree, tmp_path):
    out = tmp_path / "t"
    run_table(image_tree, out)
    with pytest.raises(FileExistsError):
        run_table(image_tree, out)  # full mode over a table: refused while planning
    assert len(_records(out)) == 1


def test_history_survives_an_overwrite(image_tree, tmp_path):
    out = tmp_path / "t"
    first = run_table(image_tree, out)
    second = run_table(image_tree, out, overwrite=True)
    assert [r["run_id"] for r in _records(out)] == [
        second["run"]["run_id"],
        first["run"]["run_id"],
    ]
    assert all(r["status"] == history.SUCCEEDED for r in _records(out))
    assert table.read_table(str(out)).num_rows == 12  # the table is not mistaken for more


def test_runs_lists_newest_first_with_freshness_and_pending_images(image_tree, tmp_path, capsys):
    out = tmp_path / "t"
    first = run_table(image_tree, out)["run"]["run_id"]
    second = run_table(image_tree, out, mode="incremental")["run"]["run_id"]
    _add_images(image_tree, 3)
    runs_job.main([str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["run", "status"]
    assert [line.split()[0] for line in printed[1:3]] == [second, first]
    assert printed[1].split()[1] == "succeeded"
    assert any(line.startswith(f"last successful run: {second}, ") for line in printed), printed
    assert "3 images listed but not yet embedded" in printed
    assert len(list((out / history.RUNS_DIR).iterdir())) == 2  # nothing written by looking

    runs_job.main([str(out), "--json", "--limit", "1"])
    result = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in result["runs"]] == [second] and result["total_runs"] == 2
    assert result["freshness"]["pending"] == 3 and result["freshness"]["last_success"] == second
    assert result["freshness"]["since_last_success_s"] >= 0

    runs_job.main([str(out), "--json", "--no-pending"])
    assert json.loads(capsys.readouterr().out)["freshness"]["pending"] is None


def test_runs_counts_pending_images_from_any_folder_and_logs_no_run(
    image_tree, tmp_path, capsys, monkeypatch, caplog
):
    # Inputs given relative to the folder the run started in were recorded as given: `runs`
    # from another folder could not list them. Counting them also logged a run id that no
    # record has.
    out = tmp_path / "t"
    monkeypatch.chdir(image_tree.parent)
    run_table(image_tree.name, out)
    assert _records(out)[0]["inputs"] == [str(image_tree)]
    _add_images(image_tree, 1)
    monkeypatch.chdir(tmp_path.parent)
    caplog.set_level("INFO")
    runs_job.main([str(out)])
    printed = capsys.readouterr().out
    assert "\n1 image listed but not yet embedded" in printed, printed
    assert not [r for r in caplog.records if r.name == "pipeline.launch"]


def test_runs_shows_why_a_run_failed(image_tree, tmp_path, capsys):
    out = tmp_path / "t"
    with pytest.raises(Exception, match="out of quota"):
        _launch_failing(image_tree, out, OSError("out of quota"))
    runs_job.main([str(out), "--no-pending"])
    printed = capsys.readouterr().out
    assert " failed " in printed.splitlines()[1]
    assert "failed: OSError: out of quota" in printed
    assert "no successful run recorded" in printed


@pytest.mark.parametrize("make", ["missing", "no history"])
def test_runs_without_history_is_one_line_and_exit_2(tmp_path, capsys, make):
    out = tmp_path / "t"
    if make == "no history":
        out.mkdir()
    with pytest.raises(SystemExit) as refused:
        runs_job.main([str(out)])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0]


#: A real launcher (under ``cli.run_main``, as a job runs) whose graph waits in a step until it
#: is stopped or killed; it heartbeats every 0.2 s.
_HANGING_JOB = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests"]
    import apache_beam as beam
    from conftest import local_pipeline
    from fakes import MeanColorHandler
    from pipeline import cli, launch
    from transforms import history
    from transforms.table_job import run_metadata

    history.HEARTBEAT_S = 0.2

    def hang(_):
        open(sys.argv[2] + ".started", "w").close()
        time.sleep(600)

    cli.run_main(lambda argv: launch.launch(
        launch.TableRun(inputs=(sys.argv[1],), output=sys.argv[2], mode="incremental"),
        metadata=run_metadata(MeanColorHandler()),
        build=lambda p, run, held: p | beam.Create([1]) | beam.Map(hang),
        beam_args=[],
        test_pipeline=local_pipeline(),
        command="extract",
    ), [])
    """
)


def _start_hanging_job(images, out):
    job = subprocess.Popen(
        [sys.executable, "-c", _HANGING_JOB, str(images), str(out), os.getcwd()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(f"{out}.started"):
        assert job.poll() is None, job.stderr.read()
        assert time.monotonic() < deadline, "the job never started its step"
        time.sleep(0.1)
    return job


def test_a_killed_run_is_shown_not_finished_with_its_last_heartbeat(image_tree, tmp_path, capsys):
    out = tmp_path / "t"
    job = _start_hanging_job(image_tree, out)
    try:
        time.sleep(2.5)  # a few heartbeats
        runs_job.main([str(out), "--no-pending"])
        assert capsys.readouterr().out.splitlines()[1].split()[1] == "running"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    (record,) = _records(out)
    assert record["status"] == history.RUNNING  # nobody was left to say otherwise
    assert record["heartbeat"] > record["started"]  # the launcher kept it fresh until killed
    assert leases.read_lease(str(out))["run_id"] == record["run_id"]  # its lease is left too

    runs_job.main([str(out), "--no-pending"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[:3] == [record["run_id"], "not", "finished"]
    assert any(
        line.startswith(f"{record['run_id']} did not finish: last heartbeat ")
        and f"pid {job.pid}" in line
        for line in printed
    ), printed

    retried = run_table(image_tree, out)  # the retry takes the dead run's lease over
    runs_job.main([str(out), "--json", "--no-pending"])
    shown = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["run_id"], r["shown_status"]) for r in shown] == [
        (retried["run"]["run_id"], history.SUCCEEDED),
        (record["run_id"], history.NOT_FINISHED),
    ]


def test_a_run_stopped_by_sigterm_is_recorded_stopped(image_tree, tmp_path):
    out = tmp_path / "t"
    job = _start_hanging_job(image_tree, out)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, err
    (record,) = _records(out)
    assert record["status"] == history.STOPPED and record["reason"] == "stopped by SIGTERM"
    assert leases.read_lease(str(out)) is None
