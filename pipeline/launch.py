"""Launching a run that writes a table: take the lease, plan, submit, wait.

Shared by the jobs that write tables (``extract``, ``classify``). The order matters:

1. the inputs are checked;
2. ``--plan-only`` and Beam's ``--dry_run`` plan and stop there (a dry run also builds and
   translates the graph): nothing in the output folder is created, changed or removed;
3. otherwise the table's lease is taken (one writer per table), an ``--overwrite`` run that died
   there is settled (``plan_files.settle``), the run is planned under the lease, the plan file
   is written, and the pipeline runs; its first step removes stale rows, its last writes the
   summary and gives the lease back. An ``--overwrite`` run writes its new table to a staging
   folder, and that last step moves it in, writes the summary and only then removes the old
   shards. When the run fails or is stopped, the launcher removes its plan file and settles its
   staging: before its summary was written the overwritten table is left exactly as it was,
   after it the new table is completed.

A planned run leaves a record in the table's history (``transforms.history``, ``_RUNS/``): written
``running`` before the plan file, its heartbeat refreshed while the launcher waits, marked
``succeeded`` by the pipeline's last step, ``failed`` or ``stopped`` here.

Classic Dataflow templates (``--template_location``) are refused: a template built now would run
later with a plan frozen at build time. The flex template (``deploy/dataflow``) plans at launch:
Dataflow's launcher runs its main file with ``--template_location=gs://.../job_object``, and
Beam's DataflowRunner then writes the job there instead of creating it (``run()`` returns a result
with no job; the launcher creates the job from that file once the main file has exited). That
main file (``deploy/dataflow/main.py``) sets :data:`FLEX_LAUNCH_ENV`, which is what tells the
flex launch from a classic template being built. A flex launch *submits and returns*: it takes
the lease, settles dead runs, plans, writes the plan file and the job, and exits without waiting,
leaving the lease held and the plan in place for the workers, which renew the lease as they embed
and whose last step removes the plan and gives the lease back. A launch that fails before the job
is written removes its plan and gives the lease back, as any failed run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, TestOptions

from pipeline import logs, runners
from transforms import history, listing, plan_files, startup, storage, table
from transforms import lease as leases
from transforms import plan as plans
from transforms.embed.progress import Progress
from transforms.extract import DEFAULT_CHUNK_SIZE, MODES

_LOG = logging.getLogger(__name__)

#: Set to ``1`` by the flex template's main file (``deploy/dataflow/main.py``): a
#: ``--template_location`` is then the launcher's job file, not a classic template.
FLEX_LAUNCH_ENV = "FEATUREBEAM_FLEX_LAUNCH"


@dataclasses.dataclass(frozen=True)
class TableRun:
    """What to list and how to treat the table already in ``output``; validated once."""

    inputs: tuple[str, ...]
    output: str
    mode: str = "full"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    retry_errors: bool = False
    prune: bool = False
    overwrite: bool = False
    plan_only: bool = False
    include_all_files: bool = False
    stat_manifest: bool = False
    break_lease: bool = False
    lease_expiry_s: float = leases.DEFAULT_EXPIRY_S
    allow_empty: bool = False
    #: For messages: the flag that named ``inputs``, and whether the job offers ``--allow-empty``.
    input_flag: str = "--input"
    offers_allow_empty: bool = True

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("at least one --input is required")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.lease_expiry_s <= 0:
            raise ValueError("--lease-expiry must be > 0 seconds")
        if self.mode == "incremental" and self.overwrite:
            raise ValueError("--overwrite starts a new table; it cannot be --mode incremental")
        if self.prune and self.mode != "incremental":
            raise ValueError("--prune removes rows of an existing table: use --mode incremental")


class RunIncomplete(OSError):
    """The runner returned as if the pipeline had finished, but a table's last step never ran
    (no summary of this run): e.g. a Dask client that lost its scheduler ends its wait quietly."""


class EmptyListing(ValueError):
    """The inputs list no image (and ``--allow-empty`` was not given)."""


def check_not_empty(spec: TableRun, found: listing.Listing) -> None:
    """Refuses a listing with no image unless ``allow_empty``: an empty table is rarely what was
    meant, and with ``--prune`` it would remove every row of the table (a bucket listed empty by
    mistake would delete everything).

    Raises:
        EmptyListing: one line naming the inputs and the files skipped, by reason.
    """
    if found.images.num_rows or spec.allow_empty:
        return
    inputs, flag = ", ".join(spec.inputs), spec.input_flag
    skipped = (
        f"{found.skipped} files skipped: {listing.describe_skipped(found.skipped_reasons)}"
        if found.skipped
        else "no file at all"
    )
    if spec.prune:
        advice = (
            f"with --prune this would remove every row of {spec.output}, so nothing was changed; "
            f"check {flag}, or pass --allow-empty if the inputs really are empty"
        )
    elif spec.offers_allow_empty:
        advice = f"check {flag}, or pass --allow-empty to write an empty table"
    else:
        advice = f"check {flag}"
    raise EmptyListing(f"no images listed from {flag} {inputs} ({skipped}); {advice}")


#: ``build(pipeline, run_plan, lease)`` adds the job's graph for a planned run.
Build = Callable[[beam.Pipeline, plans.RunPlan, "leases.Lease | None"], Any]
#: ``build(pipeline, run_plans, leases)``: the same for several tables written by one pipeline.
BuildTables = Callable[[beam.Pipeline, list[plans.RunPlan], list["leases.Lease | None"]], Any]


def plan(
    spec: TableRun, metadata: dict[str, str], run_id: str | None = None, *, log: bool = True
) -> plans.Plan:
    """Lists the inputs and plans the run against the table; writes nothing."""
    return plan_tables([spec], [metadata], run_id, log=log)[0]


def plan_tables(
    specs: Sequence[TableRun],
    metadatas: Sequence[dict[str, str]],
    run_id: str | None = None,
    *,
    log: bool = True,
) -> list[plans.Plan]:
    """Lists the inputs once and plans each table against it, in shared chunks; logs what the
    run does in one line (unless ``log`` is false: a plan that is only counted); writes nothing.

    Raises:
        EmptyListing: no image was listed (:func:`check_not_empty`).
    """
    first = specs[0]
    run_id = run_id or plans.new_run_id()  # one run, one id, however many tables
    found = listing.list_inputs(
        first.inputs, include_all_files=first.include_all_files, stat_manifest=first.stat_manifest
    )
    for spec in specs:
        check_not_empty(spec, found)
    planned = [
        plans.plan_run(
            found,
            spec.output,
            metadata=metadata,
            incremental=spec.mode == "incremental",
            chunk_size=spec.chunk_size,
            overwrite=spec.overwrite,
            retry_errors=spec.retry_errors,
            prune=spec.prune,
            run_id=run_id,
        )
        for spec, metadata in zip(specs, metadatas, strict=True)
    ]
    startup.mark("list + plan")
    planned = plans.align_chunks(planned)
    if log:
        _LOG.info("%s", describe_pass([p.run for p in planned], metadatas))
    return planned


def describe_pass(runs: Sequence[plans.RunPlan], metadatas: Sequence[dict[str, str]]) -> str:
    """What a run does, in one line; for several tables (backbones), what it does for each."""
    first = runs[0]
    line = (
        f"run {first.run_id}: {first.listed} images listed, {first.pass_images} to embed in "
        f"{first.num_chunks} chunk(s)"
    )

    def kept(run):
        return (
            f"{run.kept_rows} rows and {run.kept_errors} errors kept, {run.stale_rows} stale "
            "rows to remove"
        )

    if len(runs) == 1:
        return f"{line}, {kept(first)}"
    each = "; ".join(
        f"{meta.get('backbone', run.output_dir)}: {run.to_embed} to embed, {kept(run)}"
        for run, meta in zip(runs, metadatas, strict=True)
    )
    return f"{line} for {len(runs)} backbones ({each})"


def launch(
    spec: TableRun,
    *,
    metadata: dict[str, str],
    build: Build,
    beam_args: Sequence[str],
    test_pipeline: beam.Pipeline | None = None,
    run_id: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs (or only plans) a table-writing job; returns the table summary, or the plan.

    Raises:
        FileNotFoundError: an input does not exist.
        FileExistsError: full mode over an existing table without ``--overwrite``.
        plans.IncompatibleTableError: an incremental run with another recipe.
        leases.LeaseHeld: another run is writing the table.
        EmptyListing: the inputs list no image, and ``allow_empty`` is false.
    """
    return launch_tables(
        [spec],
        metadatas=[metadata],
        build=lambda p, runs, held: build(p, runs[0], held[0]),
        beam_args=beam_args,
        test_pipeline=test_pipeline,
        run_id=run_id,
        command=command,
    )[0]


def launch_tables(
    specs: Sequence[TableRun],
    *,
    metadatas: Sequence[dict[str, str]],
    build: BuildTables,
    beam_args: Sequence[str],
    test_pipeline: beam.Pipeline | None = None,
    run_id: str | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`launch` for several tables over the same inputs written by one pipeline (a
    multi-backbone run): one listing, a lease and a plan per table, shared chunks; returns each
    table's summary (or plan), in order. Raises as :func:`launch` does, for any table."""
    first = specs[0]
    listing.check_sources(first.inputs)
    options = runners.pipeline_options(runners.beam_flags(beam_args))
    job_file = submits_only(options)
    dry_run = bool(options.view_as(TestOptions).dry_run)
    if first.plan_only or dry_run:
        planned = plan_tables(specs, metadatas)
        runs = [p.run for p in planned]
        if dry_run:  # translate the graph (the runner submits nothing); the plan file is unwritten
            runners.run_graph(
                lambda p: build(p, runs, [None] * len(runs)), beam_args, test_pipeline
            )
        results = []
        for spec, run in zip(specs, runs, strict=True):
            holder = leases.read_lease(spec.output)
            results.append(
                {
                    "plan_only": first.plan_only,
                    "dry_run": dry_run,
                    "plan": run,
                    "lease": leases.describe(holder) if holder else None,
                }
            )
        return results
    run_id = run_id or plans.new_run_id()
    new_outputs = [spec.output for spec in specs if not storage.exists(spec.output)]
    try:
        return _run_tables(
            specs,
            metadatas,
            build=build,
            beam_args=beam_args,
            test_pipeline=test_pipeline,
            run_id=run_id,
            command=command,
            job_file=job_file,
        )
    except BaseException:
        for output in new_outputs:  # a refused or failed run on a new output leaves no folder
            with contextlib.suppress(OSError):  # never hide why the run ended
                storage.remove_if_empty(output)
        raise


def _committed(runs: Sequence[plans.RunPlan], beam_args: Sequence[str]) -> list[dict[str, Any]]:
    """Every table's summary, each checked to be this run's: a runner that returns without
    running the last step must not pass for a finished run (nor an older run's summary for this
    one's).

    Raises:
        RunIncomplete: a table holds no summary of this run.
    """
    summaries = []
    for run in runs:
        try:
            summary = table.read_summary(run.output_dir)
        except FileNotFoundError:
            summary = {}
        if summary.get("run", {}).get("run_id") != run.run_id:
            raise RunIncomplete(
                f"run {run.run_id} ended without finishing {run.output_dir}: the "
                f"{runners.runner_name(beam_args)} runner returned, but the table's last step "
                "never ran (for Dask: was the scheduler lost?); the chunks it finished are kept: "
                "rerun with --mode incremental to finish the table"
            )
        summaries.append(summary)
    return summaries


def submits_only(options) -> str | None:
    """The job file a flex launch writes (``--template_location`` under
    :data:`FLEX_LAUNCH_ENV`), or None for a run that is waited for.

    Raises:
        ValueError: a ``--template_location`` outside a flex launch (a classic template).
    """
    job_file = options.view_as(GoogleCloudOptions).template_location
    if job_file and os.environ.get(FLEX_LAUNCH_ENV) != "1":
        raise ValueError(
            "classic templates (--template_location) would run later with a plan made now; "
            "use the flex template in deploy/dataflow, which plans when it is launched"
        )
    return job_file or None


def _run_tables(
    specs: Sequence[TableRun],
    metadatas: Sequence[dict[str, str]],
    *,
    build: BuildTables,
    beam_args: Sequence[str],
    test_pipeline: beam.Pipeline | None,
    run_id: str,
    command: str | None,
    job_file: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`launch_tables` from the lease on. With ``job_file`` (a flex launch) the run is
    submitted and not waited for: the lease stays held and the plan stays, for the workers."""
    with contextlib.ExitStack() as stack:
        held = []
        for spec in specs:  # one writer per table; a held one releases those taken before it
            lease = leases.acquire(
                spec.output, run_id, expiry_s=spec.lease_expiry_s, break_lease=spec.break_lease
            )
            stack.enter_context(leases.holding(lease, release=job_file is None))
            held.append(lease)
            plan_files.settle_dead_runs(spec.output)  # before the table is read for planning
        planned = plan_tables(specs, metadatas, run_id)
        runs = [p.run for p in planned]
        try:
            for run, spec, metadata in zip(runs, specs, metadatas, strict=True):
                history.start(
                    run,
                    metadata=metadata,
                    command=command,
                    mode=spec.mode,
                    inputs=spec.inputs,
                    runner=runners.runner_name(beam_args),
                    listing_flags={
                        "include_all_files": spec.include_all_files,
                        "stat_manifest": spec.stat_manifest,
                    },
                )
            with history.beating(runs):  # stopped before the record's last word, below
                for planned_table in planned:
                    plan_files.write_plan(planned_table)
                bar = logs.progress_enabled()
                Progress.start(runs[0].pass_images, bar=bar)  # images, however many tables
                try:
                    with logs.around_bar(bar):  # log lines print above the bar, not through it
                        runners.run_graph(lambda p: build(p, runs, held), beam_args, test_pipeline)
                finally:
                    Progress.finish()
                # A flex launch only wrote the job: nothing ran yet.
                summaries = _committed(runs, beam_args) if job_file is None else []
        except BaseException as exc:  # failed, Ctrl-C, SIGTERM: leave no plan, no half-made table
            for run in runs:
                try:
                    plan_files.discard(run)
                except Exception as error:  # never hide why the run ended; the next run cleans up
                    _LOG.warning("could not remove run %s's plan or staging: %s", run.run_id, error)
                try:
                    history.ended(run.output_dir, run.run_id, exc)
                except Exception as error:  # the same: the run's own error is what matters
                    _LOG.warning("could not record how run %s ended: %s", run.run_id, error)
            raise
    if job_file is not None:
        return [
            {"submitted": job_file, "plan": run, "lease": leases.describe(leases.read_lease(o))}
            for run, o in zip(runs, [spec.output for spec in specs], strict=True)
        ]
    for run, summary in zip(runs, summaries, strict=True):
        try:  # also written by the pipeline's last step; again here, after the heartbeat stopped
            history.succeeded(run.output_dir, run.run_id, summary)
        except Exception as error:  # the table is committed: a run that succeeded says so
            _LOG.warning("could not record run %s as succeeded: %s", run.run_id, error)
    return summaries
