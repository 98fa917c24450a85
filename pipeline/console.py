"""``featurebeam COMMAND [flags]``: every job as one console command, declared in
``pyproject.toml`` beside the ``python -m pipeline.X`` forms. ``featurebeam extract ...`` runs
exactly ``python -m pipeline.extract ...`` (and ``featurebeam bench`` is ``python -m benchmarks``);
the job module is imported only once it is chosen, so ``featurebeam --help`` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

#: Command -> (job module, one line on what it does).
COMMANDS = {
    "extract": ("pipeline.extract", "images -> backbone(s) -> Parquet feature tables"),
    "backbones": ("pipeline.backbones", "the registered backbones: family, size, width, weights"),
    "train-head": ("pipeline.train_head", "a new classifier head on feature tables"),
    "classify": ("pipeline.classify", "ImageNet top, a trained head, or zero-shot labels"),
    "export-model": ("pipeline.export_model", "backbone + head as one Keras model"),
    "finetune": ("pipeline.finetune", "fine-tune an exported model's backbone"),
    "stage-weights": ("pipeline.stage_weights", "copy a backbone's weights to a bucket"),
    "sample-weights": ("pipeline.sample_weights", "prepare the offline real MobileNetV2"),
    "neighbors": ("pipeline.neighbors", "nearest neighbours, near-duplicates, k-NN accuracy"),
    "index": ("pipeline.index", "build or update a table's search index, in place"),
    "serve": ("pipeline.serve", "search a table by image, id or words: API and page"),
    "report": ("pipeline.report", "a self-contained HTML page to look at a feature table"),
    "runs": ("pipeline.runs", "a table's run history and freshness"),
    "bench": ("benchmarks.bench", "throughput and memory benchmark"),
}


def usage() -> str:
    lines = ["usage: featurebeam COMMAND [flags]   (featurebeam COMMAND --help for its flags)", ""]
    lines += [f"  {name:<15} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            sys.exit(2)
        return
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sys.exit(f"featurebeam: unknown command {argv[0]!r}{hint}\n\n{usage()}")
    module = importlib.import_module(COMMANDS[name][0])
    from pipeline import cli

    # Help, usage and errors name the command as typed here: ``featurebeam extract``.
    with cli.invoked_as(module.__name__.removesuffix(".bench"), f"featurebeam {name}"):
        module.main(argv[1:])


if __name__ == "__main__":
    main()
