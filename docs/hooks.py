"""MkDocs hook (``hooks:`` in ``mkdocs.yml``): the pages that must not drift from the code are
written at build time from the code itself.

- ``commands/*.md``: one reference page per ``featurebeam`` command, from its argument parser
  (the commands are ``pipeline.console.COMMANDS``, the console script's own table; each page is
  what ``featurebeam COMMAND --help`` says, as a table per flag group);
- the backbone table: ``<!-- generated: backbones -->`` in a page is replaced by one row per
  registered backbone, from ``pipeline.backbones.rows()`` (what ``featurebeam backbones``
  prints, from ``transforms/models/registry.py``).

A flag or a backbone added to the code appears in the site with no edit here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the hook imports the project (installed in .venv, or the checkout)
    sys.path.insert(0, str(ROOT))

BACKBONES_MARKER = "<!-- generated: backbones -->"
COMMANDS_MARKER = "<!-- generated: commands -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def parser_for(name: str) -> tuple[str, argparse.ArgumentParser]:
    """The module and the argument parser of ``featurebeam NAME``, named as the console names it."""
    from pipeline import cli, console

    module_name = console.COMMANDS[name][0]
    module = importlib.import_module(module_name)
    build = getattr(module, "build_parser", None)
    if build is None:  # extract's parser lives beside its config object
        build = importlib.import_module("pipeline.config").build_parser
    with cli.invoked_as(module_name.removesuffix(".bench"), f"featurebeam {name}"):
        return module_name, build()


def _flag(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
    if action.nargs != 0:
        if action.choices:
            names += " " + "\\|".join(str(c) for c in action.choices)
        elif action.metavar:
            names += " " + _cell(action.metavar)
        elif action.option_strings:
            names += " " + action.dest.upper()
    return names


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    text = formatter._expand_help(action) if action.help else ""
    if action.required:
        text = "**required.** " + text
    return _cell(text)


def command_page(name: str) -> str:
    """The reference page of ``featurebeam NAME``: its description, usage, and every flag."""
    from pipeline import console

    module_name, parser = parser_for(name)
    os.environ.setdefault("COLUMNS", "100")
    usage = "\n".join(  # without argparse's "usage: ", and its indent under it
        line.removeprefix(" " * len("usage: "))
        for line in parser.format_usage().strip().removeprefix("usage: ").splitlines()
    )
    what = console.COMMANDS[name][1]
    as_module = "python -m benchmarks" if name == "bench" else f"python -m {module_name}"
    lines = [
        f"# featurebeam {name}",
        "",
        f"{what[0].upper()}{what[1:]}. Run as `featurebeam {name} ...` or `{as_module} ...`.",
        "",
        "<!-- This page is generated from the command's argument parser by docs/hooks.py. -->",
        "",
    ]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", usage, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        title = group.title or "flags"
        if title in ("options", "optional arguments"):
            title = "flags"
        lines += [f"## {title[0].upper()}{title[1:]}", ""]
        if group.description:
            lines += [group.description, ""]
        lines += ["| flag | what it does |", "|---|---|"]
        lines += [f"| {_flag(a)} | {_help(parser, a)} |" for a in actions]
        lines.append("")
    if name in ("extract", "classify", "neighbors"):
        lines += [
            "Beam's own flags and the runners' (`--runner`, `--direct_num_workers`, "
            "`--temp_location`, Dataflow's `--region`, the DaskRunner's "
            "`--dask_client_address`, ...) are passed to Beam; any other flag ends the job "
            "before it starts, naming the closest valid one. Our flags also accept underscores "
            "(`--batch_size`).",
            "",
        ]
    return "\n".join(lines)


def page_file(name: str) -> str:
    """A command's page: ``commands/NAME.md``, except ``featurebeam index``'s, as the folder's
    own ``index.md`` is this overview."""
    return "commands/index-command.md" if name == "index" else f"commands/{name}.md"


def commands_index() -> str:
    from pipeline import console

    rows = [
        f"| [`featurebeam {name}`]({page_file(name).removeprefix('commands/')}) | {_cell(what)} |"
        for name, (_, what) in console.COMMANDS.items()
    ]
    return "\n".join(["| command | what it does |", "|---|---|", *rows])


def backbones_table() -> str:
    from pipeline import backbones

    head = "| " + " | ".join(backbones.COLUMNS) + " |"
    rule = (
        "|"
        + "|".join("---:" if i in (2, 3, 4) else "---" for i in range(len(backbones.COLUMNS)))
        + "|"
    )
    rows = [
        "| " + " | ".join(f"`{c}`" if i == 0 else _cell(c) for i, c in enumerate(row)) + " |"
        for row in backbones.rows()
    ]
    return "\n".join([head, rule, *rows])


def on_files(files, config):
    """Adds one generated page per command under ``commands/``."""
    from pipeline import console

    for name in console.COMMANDS:
        files.append(File.generated(config, page_file(name), content=command_page(name)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Fills the generated tables into the pages that hold their markers."""
    if BACKBONES_MARKER in markdown:
        markdown = markdown.replace(BACKBONES_MARKER, backbones_table())
    if COMMANDS_MARKER in markdown:
        markdown = markdown.replace(COMMANDS_MARKER, commands_index())
    return markdown
