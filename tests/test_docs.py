"""The documented commands work as written (issue 20, item 4).

The README's and the getting-started page's shell blocks (```bash fences) run in order in a
temporary folder, with this environment's ``bin/`` first on ``PATH`` (so ``featurebeam`` is the
installed console script); ```python blocks run there too, with this Python. An HTML comment on
the line before a fence says how a block is treated:

- ``<!-- docs-test: needs-internet -->`` / ``needs-cloud`` / ``skip REASON``: not run; each is its
  own skipped test, so ``pytest -ra`` counts and names them;
- ``<!-- docs-test: ants-bees-download -->``: the download of the ants/bees photos, replaced by a
  link to the shared copy at ``../shared/data/hymenoptera`` (the test skips, saying so, where that
  folder is absent);
- ``<!-- docs-test: make-targets -->``: ``make demo`` runs the Makefile's own demo recipe here;
  ``make test`` is this suite, so it is not run from inside it;
- ``<!-- docs-test: output -->`` before a ```text block: what the block before it prints; each
  line must appear in that output (whitespace runs compared as one space, ``...`` for anything).

Beside running them, every ``featurebeam`` command line in every page (run or not) is checked
against its command's parser, so a renamed flag fails even in a block that needs the internet.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ANTS_BEES = REPO.parent / "shared" / "data" / "hymenoptera"
#: The pages whose blocks are run, each in its own folder.
RUN_PAGES = ("README.md", "docs/getting-started.md")
#: Every page whose command lines are checked against the parsers.
ALL_PAGES = ("README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md")))

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*([\w-]+)\s*(.*?)\s*-->$")
NOT_RUN = {
    "needs-internet": "needs the internet",
    "needs-cloud": "needs a cloud account or cluster",
    "skip": "",
}
BLOCK_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it is, its language, its text, and its marker."""

    page: str
    line: int
    lang: str
    text: str
    marker: str | None = None
    note: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        if self.marker not in NOT_RUN:
            return None
        return "; ".join(r for r in (NOT_RUN[self.marker], self.note) if r)


class BlockFailed(AssertionError):
    """A documented block that does not work as written."""


def parse_blocks(text: str, page: str = "<text>") -> list[Block]:
    """The fenced blocks of a Markdown text, each with the marker on the line before its fence."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        start, j = i, i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        marker = note = None
        k = start - 1
        if k >= 0 and (m := _MARKER.match(lines[k].strip())):
            marker, note = m.group(1), m.group(2)
        found.append(
            Block(
                page,
                start + 1,
                opened.group(1),
                "\n".join(lines[start + 1 : j]),
                marker,
                note or "",
            )
        )
        i = j + 1
    return found


def page_blocks(page: str) -> list[Block]:
    return parse_blocks((REPO / page).read_text(), page)


def environment() -> dict[str, str]:
    """This Python's ``bin/`` first on PATH: ``featurebeam`` is the console script installed here."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs a bash or python block in ``cwd``; returns what it printed (stdout and stderr).

    Raises:
        BlockFailed: the block exits non-zero, naming where it is and what it printed.
    """
    if block.lang == "python":
        argv = [sys.executable, "-c", block.text]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", block.text]
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise BlockFailed(
            f"{block.where}: exit status {done.returncode} running\n{block.text}\n"
            f"--- it printed (last 3000 characters):\n{output[-3000:]}"
        )
    return output


def _squash(text: str) -> str:
    return " ".join(text.split())


def check_output(expected: Block, output: str, ran: Block) -> None:
    """Every line of ``expected`` appears in ``output`` (``...`` stands for anything).

    Raises:
        BlockFailed: a line that the command no longer prints.
    """
    printed = _squash(output)
    for line in expected.text.splitlines():
        for fragment in (f.strip() for f in line.split("...")):
            if fragment and _squash(fragment) not in printed:
                raise BlockFailed(
                    f"{expected.where}: the output shown for {ran.where} says {fragment!r}, "
                    f"which it no longer prints; it printed:\n{output[-3000:]}"
                )


def make_recipe(target: str) -> list[str]:
    """The Makefile's commands for ``target``, with ``$(PY)`` as this Python."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(PY)", shlex.quote(sys.executable)))
    return recipe


def link_ants_bees(cwd: Path) -> None:
    """In place of the download: ``hymenoptera_data`` is the shared copy of the same folders."""
    (cwd / "hymenoptera_data").symlink_to(SHARED_ANTS_BEES, target_is_directory=True)


def run_page(page: str, cwd: Path, blocks: list[Block] | None = None) -> dict[str, list[str]]:
    """Runs a page's blocks in order in ``cwd``; returns where each ran or was not run.

    Raises:
        BlockFailed: the first block that fails, or output that no longer matches.
    """
    blocks = page_blocks(page) if blocks is None else blocks
    env = environment()
    report: dict[str, list[str]] = {"ran": [], "checked": [], "not run": []}
    last: tuple[Block, str] | None = None
    for block in blocks:
        if block.marker == "output":
            if last is None:
                raise BlockFailed(f"{block.where}: an output block with no command before it")
            check_output(block, last[1], last[0])
            report["checked"].append(block.where)
        elif block.lang not in ("bash", "python"):
            continue
        elif block.skip_reason is not None:
            report["not run"].append(f"{block.where} ({block.skip_reason})")
        elif block.marker == "ants-bees-download":
            link_ants_bees(cwd)
            report["ran"].append(f"{block.where} (the shared copy in place of the download)")
        elif block.marker == "make-targets":
            output = ""
            for line in block.text.splitlines():
                words = shlex.split(line, comments=True)
                if words == ["make", "test"]:
                    report["not run"].append(f"{block.where} make test (this suite)")
                    continue
                if words[:1] == ["make"]:
                    recipe = Block(block.page, block.line, "bash", "\n".join(make_recipe(words[1])))
                    output += run_block(recipe, cwd, env)
                    report["ran"].append(f"{block.where} {line.split('#')[0].strip()}")
            last = (block, output)
        else:
            last = (block, run_block(block, cwd, env))
            report["ran"].append(block.where)
    return report


def _not_run_blocks() -> list[Block]:
    return [b for page in RUN_PAGES for b in page_blocks(page) if b.skip_reason is not None]


# -- the pages, run -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_runs_as_written(page, tmp_path, capsys):
    blocks = page_blocks(page)
    if any(b.marker == "ants-bees-download" for b in blocks) and not SHARED_ANTS_BEES.is_dir():
        pytest.skip(
            f"{page} downloads the ants/bees photos; the test uses the shared copy at "
            f"{SHARED_ANTS_BEES}, which is absent on this machine"
        )
    report = run_page(page, tmp_path, blocks)
    with capsys.disabled():
        print(
            f"\n{page}: {len(report['ran'])} blocks run, {len(report['checked'])} outputs "
            f"checked, {len(report['not run'])} not run: {'; '.join(report['not run'])}"
        )
    assert report["ran"], f"{page} has no block that runs"


@pytest.mark.parametrize("block", _not_run_blocks(), ids=lambda b: b.where)
def test_block_not_run(block):
    """One skipped test per documented block that needs what CI has not, so ``-ra`` counts them."""
    pytest.skip(f"{block.where}: {block.skip_reason}")


# -- every documented command line, against its parser -----------------------------------------


def command_lines(block: Block) -> list[list[str]]:
    """The ``featurebeam ...`` invocations of a shell block, as argument lists."""
    joined = block.text.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        for part in re.split(r"&&|;|\|", line.split(" #")[0]):
            words = shlex.split(part, comments=True)
            if words[:1] == ["featurebeam"]:
                found.append(words[1:])
    return found


def parser_of(command: str):
    from pipeline import console

    if command not in console.COMMANDS:
        return None
    module = importlib.import_module(console.COMMANDS[command][0])
    build = (
        getattr(module, "build_parser", None)
        or importlib.import_module("pipeline.config").build_parser
    )
    return build()


def unknown_flag(argv: list[str]) -> str | None:
    """What the command's parser refuses in ``argv`` (None when it takes every flag)."""
    from pipeline import cli

    if not argv:
        return None
    parser = parser_of(argv[0])
    if parser is None:
        return f"unknown command {argv[0]!r}"
    try:
        cli.refuse_unknown(parser, argv[1:], beam=True)
    except SystemExit:
        return f"refused by featurebeam {argv[0]}: {' '.join(argv[1:])}"
    return None


def _documented_commands() -> list[tuple[str, list[str]]]:
    return [
        (block.where, argv)
        for page in ALL_PAGES
        for block in page_blocks(page)
        if block.lang == "bash"
        for argv in command_lines(block)
    ]


def test_every_documented_flag_exists():
    commands = _documented_commands()
    assert len(commands) >= 15, "the pages' featurebeam commands were not found"
    refused = [f"{where}: {why}" for where, argv in commands if (why := unknown_flag(argv))]
    assert not refused, "documented commands the parsers refuse:\n" + "\n".join(refused)


# -- the runner itself --------------------------------------------------------------------------


def _readme_extract_block() -> Block:
    return next(
        b
        for b in page_blocks("README.md")
        if b.lang == "bash" and "featurebeam extract --input" in b.text
    )


def test_a_renamed_flag_fails_the_static_check():
    block = _readme_extract_block()
    doctored = dataclasses.replace(block, text=block.text.replace("--weights", "--weight-file"))
    argv = command_lines(doctored)[0]
    assert unknown_flag(argv) is not None
    assert unknown_flag(command_lines(block)[0]) is None


def test_a_renamed_flag_fails_the_run(tmp_path):
    """The README's own extract line with one flag renamed: the runner reports it as a failure."""
    block = _readme_extract_block()
    line = next(line for line in block.text.splitlines() if line.startswith("featurebeam extract"))
    doctored = dataclasses.replace(block, text=line.replace("--backbone", "--backbone-name"))
    with pytest.raises(BlockFailed, match=r"unknown flag --backbone-name"):
        run_page("README.md", tmp_path, [doctored])


def test_output_that_is_no_longer_printed_fails():
    ran = Block("p.md", 1, "bash", "featurebeam extract")
    expected = Block(
        "p.md", 5, "text", "inputs 29 = rows 28 ... errors 1\ntable:  out/demo", "output"
    )
    check_output(expected, "inputs 29 = rows 28 + errors 1\ntable: out/demo/x", ran)
    renamed = dataclasses.replace(expected, text="inputs 29 = images 28")
    with pytest.raises(BlockFailed, match="no longer prints"):
        check_output(renamed, "inputs 29 = rows 28 + errors 1", ran)


def test_markers_are_read(tmp_path):
    blocks = parse_blocks(
        "text\n<!-- docs-test: needs-internet -->\n```bash\ncurl x\n```\n\n```bash\necho hi\n```\n"
        "<!-- docs-test: output -->\n```text\nhi\n```\n<!-- docs-test: skip no reason -->\n```bash\nx\n```\n",
        "p.md",
    )
    assert [(b.lang, b.marker, b.skip_reason) for b in blocks] == [
        ("bash", "needs-internet", "needs the internet"),
        ("bash", None, None),
        ("text", "output", None),
        ("bash", "skip", "no reason"),
    ]
    assert run_page("p.md", tmp_path, blocks[1:3]) == {
        "ran": ["p.md:7"],
        "checked": ["p.md:11"],
        "not run": [],
    }


def test_readme_keeps_the_two_commands_and_the_download():
    readme = (REPO / "README.md").read_text()
    make_block = next(b for b in page_blocks("README.md") if b.marker == "make-targets")
    assert [shlex.split(line, comments=True) for line in make_block.text.splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]
    assert "https://download.pytorch.org/tutorial/hymenoptera_data.zip" in readme
    assert len(readme.splitlines()) <= 160, "the README is a quick start; the rest goes in docs/"


# -- the generated pages ------------------------------------------------------------------------


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_follow_the_code():
    """The site's backbone table has a row per registry entry and each command page every flag."""
    from pipeline import console
    from transforms.models.registry import BACKBONES

    hooks = _hooks()
    table = hooks.backbones_table()
    assert all(f"| `{name}` |" in table for name in BACKBONES)
    assert len(table.splitlines()) == len(BACKBONES) + 2
    for name in console.COMMANDS:
        page = hooks.command_page(name)
        parser = parser_of(name)
        shown = [
            a for a in parser._actions if a.help != argparse.SUPPRESS
        ]  # hidden: not documented
        flags = [o for a in shown for o in a.option_strings if o.startswith("--")]
        assert all(f"`{flag}`" in page for flag in flags), name
