"""The README cannot drift from the program.

- Every command line in a ``bash`` block of the README and of the benchmark documents (``benchmarks/README.md``,
  ``docs/benchmarks.md``) (``flamingo-vlm ...``, ``python -m flamingo_vlm...``,
  ``torchrun ... -m flamingo_vlm...``, ``python benchmarks/...``, ``bash scripts/...``) is parsed by the
  program's own argument parser: an unknown subcommand, flag or choice fails here with the line.
- Every ``python`` block compiles.
- The blocks marked ``<!-- readme-test: run -->`` (the line before the fence) run as written, offline, in a
  scratch directory that holds the small inputs the README's prose names (``a.png``, ``b.png``, a
  ``my_captions/`` folder of images with ``.txt`` captions) and links to ``configs/`` and ``tests/``.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from flamingo_vlm.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# documents whose bash blocks hold commands a reader copies (only the README's blocks are also run)
COMMAND_DOCS = [README, REPO / "benchmarks" / "README.md", REPO / "docs" / "benchmarks.md"]
RUN_MARK = "<!-- readme-test: run -->"


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    run: bool


def readme_blocks(path: Path = README) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        run = start > 0 and lines[start - 1].strip() == RUN_MARK
        blocks.append(Block(m.group(1), start + 1, "\n".join(body), run))
        i += 1
    return blocks


def command_lines(block: Block) -> list[tuple[int, list[str]]]:
    """(README line, argv) for each shell command in a block; ``\\`` continuations joined, comments dropped,
    the optional-argument brackets of the usage style (``[--model DIR]``) removed."""
    out, pending, first = [], "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        if not pending:
            first = block.line + 1 + offset
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: a multi-line argument (curl's JSON body) goes on
            pending += "\n"
            continue
        line, pending = pending.strip(), ""
        if line.startswith("$ "):
            continue
        argv = [a.strip("[]") for a in argv if a.strip("[]")]
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # PYTHONPATH=src python ...
            argv = argv[1:]
        if argv:
            out.append((first, argv))
    return out


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, call) -> None:
    """Run an entry point until its top-level ``parse_args`` returns; argparse errors (exit 2) fail."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        call()
    except _Parsed:
        return
    raise AssertionError("the entry point returned without parsing its arguments")


def _entry(argv: list[str]):
    """What to call for a README command line, or None for lines that are not ours (curl, pip, ...)."""
    if argv[0] == "flamingo-vlm":
        return lambda: cli_main(argv[1:])
    if argv[0] in ("python", "python3", "torchrun") and "-m" in argv:
        k = argv.index("-m")
        module, rest = argv[k + 1], argv[k + 2:]
        if not module.startswith("flamingo_vlm"):
            return None

        def run_module():
            sys.argv = [module, *rest]
            with warnings.catch_warnings():  # (another test imported the module already: runpy says so)
                warnings.filterwarnings("ignore", "'flamingo_vlm.* found in sys.modules", RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=False)

        return run_module
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        path, rest = REPO / argv[1], argv[2:]

        def run_script():
            sys.argv = [str(path), *rest]
            runpy.run_path(str(path), run_name="__main__")

        return run_script
    return None


COMMANDS = [(doc.relative_to(REPO), n, argv) for doc in COMMAND_DOCS for b in readme_blocks(doc)
            if b.lang in ("bash", "sh", "") for n, argv in command_lines(b)]


def test_readme_has_commands_and_runnable_blocks():
    assert sum(1 for doc, _, argv in COMMANDS if doc == Path("README.md") and argv[0] == "flamingo-vlm") >= 10
    assert sum(1 for doc, _, argv in COMMANDS if doc != Path("README.md") and argv[0] == "python") >= 5
    assert sum(b.run for b in readme_blocks()) >= 2


@pytest.mark.parametrize("line,argv", [(f"{doc}:{n}", a) for doc, n, a in COMMANDS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_readme_command_parses(line, argv, monkeypatch):
    if argv[0] == "bash":
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert (REPO / script).is_file(), f"{line}: {script} does not exist"
        return
    call = _entry(argv)
    if call is None:
        pytest.skip(f"{line}: not a flamingo-vlm entry point ({argv[0]})")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        _parse_only(monkeypatch, call)
    except SystemExit as e:
        pytest.fail(f"{line}: `{shlex.join(argv)}` is refused by the program's parser (exit {e.code})",
                    pytrace=False)


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b.lang == "python"], ids=lambda b: f"line{b.line}")
def test_readme_python_compiles(block):
    compile(block.text, f"README.md:{block.line}", "exec")


def _scratch(root: Path) -> Path:
    """The inputs the README's examples name, small: two images, a folder of captioned images."""
    colours = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60)}
    for name, colour in (("a", "red"), ("b", "blue")):
        im = Image.new("RGB", (224, 224), (235, 235, 235))
        ImageDraw.Draw(im).ellipse([60, 60, 160, 160], fill=colours[colour])
        im.save(root / f"{name}.png")
    caps = root / "my_captions"
    caps.mkdir()
    for i in range(8):  # two batches of the tiny config's 4
        name, colour = list(colours.items())[i % 3]
        im = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(im).rectangle([10 + i * 3, 10, 50, 50], fill=colour)
        im.save(caps / f"{i}.png")
        (caps / f"{i}.txt").write_text(f"a {name} square.")
    for link in ("configs", "tests"):
        (root / link).symlink_to(REPO / link)
    return root


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b.run], ids=lambda b: f"line{b.line}")
def test_readme_block_runs(block, tmp_path):
    cwd = _scratch(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    script = "set -euo pipefail\n" + block.text
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"README block at line {block.line} failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


CONFIG_FILES = sorted(
    p.relative_to(REPO).as_posix()
    for pattern in ("configs/*.yaml", "research/configs/*.yaml")
    for p in REPO.glob(pattern)
)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_file_loads(path, capsys):
    """Every config the README or the model card points at resolves as `--print-config` would."""
    assert cli_main(["train", "--config", str(REPO / path), "--print-config"]) == 0
    assert "output_dir:" in capsys.readouterr().out
