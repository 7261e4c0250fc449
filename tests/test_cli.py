"""The command line as the README documents it: every `refseg ...` line there parses to its verb."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from refseg.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
VERBS = {"train", "synth", "model-info", "demo", "prepare", "evaluate", "segment", "export-onnx", "tune"}


def readme_commands() -> list[list[str]]:
    """The README's indented `refseg ...` command lines (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", "", (REPO / "README.md").read_text())
    found = []
    for line in text.splitlines():
        if line.startswith("    refseg "):
            line = line.split("  #")[0].replace("[key=value ...]", "train.lr=2e-4")  # an override in its place
            found.append(shlex.split(line)[1:])
    return found


def test_every_documented_verb_is_in_the_readme_and_the_parser():
    commands = readme_commands()
    assert {c[0] for c in commands} == VERBS - {"demo"}  # the demo is documented as `make demo`
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(sub.choices) == VERBS


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_lines_parse(argv):
    args = build_parser().parse_args(argv)
    assert args.verb == argv[0] and callable(args.fn)
    assert args.fn.__name__ == "cmd_" + argv[0].replace("-", "_")


def test_model_info_runs_in_process(capsys):
    assert main(["model-info", "--preset", "tiny"]) == 0
    assert "total" in capsys.readouterr().out.lower()


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("refseg: error: config 'no-such-config' is neither a file nor a config shipped in configs/; "
                    "pass a YAML path")]


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "refseg.cli", "--help"], check=False, capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(verb in r.stdout for verb in VERBS)
