"""Extraction job: images -> pretrained headless CNN -> Parquet feature table.

    python -m pipeline.extract --input DIR_GLOB_OR_gs:// --output OUT_DIR \\
        --backbone resnet50 --weights imagenet --pooling avg [Beam flags]
    python -m pipeline.extract --demo     # offline: sample photos, real MobileNetV2 weights

See ``python -m pipeline.extract --help``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from pipeline import runners
from pipeline.config import ExtractConfig, parse_args
from transforms import listing, storage, table
from transforms import plan as plans
from transforms.embed import BackboneModelHandler
from transforms.extract import ExtractFeatures

_LOG = logging.getLogger(__name__)
_TABLE_PREFIXES = (table.FEATURES, table.ERRORS)


def prepare_output(output: str, *, overwrite: bool) -> None:
    """Refuses to mix with an existing table unless ``overwrite``, which removes it first.

    Raises:
        FileExistsError: the output already holds a table and ``--overwrite`` was not given.
    """
    existing = [f for p in _TABLE_PREFIXES for f in table.shard_files(output, p)]
    for name in (table.SUMMARY_FILE, plans.PLANS_DIR):
        if storage.exists(storage.join(output, name)):
            existing.append(storage.join(output, name))
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"{output} already holds a feature table ({len(existing)} files); pass --overwrite "
            "to replace it, --mode incremental to add new images to it (or to finish a run "
            "that was killed), or choose another --output"
        )
    fs, _ = storage.filesystem(output)
    fs.rm([storage.filesystem(f)[1] for f in existing], recursive=True)


def build(pipeline: beam.Pipeline, config: ExtractConfig, *, processes_per_machine: int = 1):
    """Adds the extraction graph for ``config`` to ``pipeline``; returns the summary PCollection."""
    threads = config.intra_op_threads or runners.thread_share(processes_per_machine)
    handler = BackboneModelHandler(
        config.model,
        batch_size=config.batch_size,
        cache_dir=config.cache_dir,
        precision=config.precision,
        intra_op_threads=threads,
    )
    return pipeline | "ExtractFeatures" >> ExtractFeatures(
        list(config.inputs),
        config.output,
        model_handler=handler,
        mode=config.mode,
        chunk_size=config.chunk_size,
        decode_threads=config.decode_threads,
        retry_errors=config.retry_errors,
        resize=config.resize,
        max_pixels=config.max_pixels,
    )


def run(
    argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None
) -> dict[str, Any]:
    """Parses flags, builds the graph, runs it; returns the table summary plus ``seconds``."""
    config, beam_args = parse_args(argv)
    listing.check_sources(config.inputs)
    if config.mode == "full":
        prepare_output(config.output, overwrite=config.overwrite)
    started = time.monotonic()
    processes = runners.local_processes(beam_args)
    runners.run_graph(
        lambda p: build(p, config, processes_per_machine=processes), beam_args, test_pipeline
    )
    summary = table.read_summary(config.output)
    summary["seconds"] = time.monotonic() - started
    summary["mode"] = config.mode
    summary["output"] = config.output
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    out = summary["output"]
    meta = summary["metadata"]
    rate = summary["inputs"] / summary["seconds"] if summary["seconds"] else 0.0
    run = summary.get("run", {})
    return "\n".join(
        [
            f"inputs {summary['inputs']} = rows {summary['rows']} + errors {summary['errors']}",
            f"this run (mode {summary.get('mode', 'full')}): embedded {run.get('embedded', 0)} "
            f"images in {run.get('chunks', 0)} chunk(s) -> {run.get('new_rows', 0)} new rows, "
            f"{run.get('new_errors', 0)} new errors; kept {run.get('kept_rows', 0)} rows, "
            f"removed {run.get('stale_rows_removed', 0)} stale rows",
            f"backbone {meta['backbone']} ({meta.get('layer') or 'pooling=' + meta.get('pooling', '')}), "
            f"{meta['feature_dim']}-d vectors at {meta['input_size']} px, weights {meta['weights_fingerprint'][:23]}",
            f"{summary['seconds']:.1f} s wall time, {rate:.1f} images/s end to end (model load included)",
            f"table:  {out}/features-*.parquet ({len(summary['feature_files'])} shard(s), "
            f"{summary.get('table_rows', summary['rows'])} rows)",
            f"errors: {out}/_errors/errors-*.parquet",
            "read it:",
            f"  pandas: pd.read_parquet('{out}')   # the vectors are in the 'feature' column",
            f"  duckdb: SELECT uri, label, len(feature) FROM '{out}/features-*.parquet' LIMIT 5",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    runners.configure_logging()
    try:
        summary = run(argv)
    except (FileExistsError, FileNotFoundError, plans.IncompatibleTableError) as exc:
        sys.exit(f"error: {exc}")
    print(format_summary(summary))
    if summary["errors"]:
        import pyarrow.compute as pc

        errors = table.read_table(summary["output"], prefix=table.ERRORS)
        for stage in sorted(set(errors.column("stage").to_pylist())):
            subset = errors.filter(pc.equal(errors.column("stage"), stage))
            print(
                f"  {subset.num_rows} {stage} errors, e.g. {subset['uri'][0]}: {subset['reason'][0]}"
            )


if __name__ == "__main__":
    main()
