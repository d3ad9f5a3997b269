"""Every documented command line parses, and its config resolves, exactly as printed.

Sources: the fenced shell blocks and the inline ``--set`` examples of README.md and
docs/predict.md, and every command's ``--help`` (its ``examples:`` lines and the override its
``--set`` help shows). A line is parsed by the real parser; where the command takes
``--config`` / ``--set``, the config is resolved as the command would resolve it (plus
``--fold`` / ``--condition``), so an override the default config rejects (``train.epochs=10``
before SWA's start) fails here. An override must also name a section the command reads.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spinegrade.cli import build_parser
from spinegrade.config import load_config
from spinegrade.engine import ablate

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "predict.md")
# Config sections each command reads; an override of another section would be ignored.
SECTIONS = {
    "prepare": {"data"}, "train": {"data", "model", "loss", "train", "eval"},
    "train-localizer": {"localizer"}, "predict": {"predict"},
    "demo": {"data", "model", "loss", "train", "eval"},
    "config": {"data", "model", "loss", "train", "eval", "localizer", "predict"},
    "ablate": {"data", "model", "loss", "train", "eval"},
    "cv": {"data", "model", "loss", "train", "eval"},
    "calibrate": {"eval", "predict"},
}


def _join_continuations(lines: list[str]) -> list[str]:
    out, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return out


def _command_lines(text: str) -> list[str]:
    """``spinegrade ...`` command lines in a text (comments, pipes and loops removed)."""
    found = []
    for line in _join_continuations(text.splitlines()):
        line = line.split(" #")[0].split(" | ")[0].strip()
        line = re.sub(r"^example:\s*", "", line)
        m = re.search(r"(?:^|do )(spinegrade \S.*?)(?:; done)?$", line)
        if m:
            found.append(m.group(1).replace("$k", "0"))
    return found


def _doc_lines() -> list[str]:
    lines = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
            lines += _command_lines(block)
        # Inline override examples: resolved through `spinegrade config`.
        for span in re.findall(r"`(--set [^`]+)`", text.replace("\n", " ")):
            if "section.key" not in span:  # the syntax itself, not an example
                lines.append(f"spinegrade config {span}")
    return lines


def _help_lines() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    lines = []
    for name, p in sub.choices.items():
        text = p.format_help()
        lines += [ln for ln in _command_lines(text) if ln.startswith(f"spinegrade {name} ")]
        flat = " ".join(text.split())  # help text wraps anywhere
        for override in re.findall(r"--set ([a-z_]+\.[a-z_]+=[^\s),\]]+)", flat):
            lines.append(f"spinegrade {name} {_stub(name)} --set {override}")
    return lines


def _stub(name: str) -> str:
    """Required arguments for a command line built from a help's ``--set`` example."""
    return {"prepare": "DATA --out CACHE", "train": "--cache C --out R",
            "train-localizer": "--data D --out L", "predict": "--localizer L D",
            "cv": "--data D --out CV", "calibrate": "RUN"}.get(name, "")


def _resolve(args) -> None:
    """Resolve the config as the command does; check the overrides' sections."""
    overrides = list(getattr(args, "overrides", []))
    for o in overrides:
        section = o.split("=", 1)[0].split(".")[0]
        assert section in SECTIONS[args.command], f"{args.command} ignores --set {o}"
    if args.command == "ablate":
        ablate.plan_runs(args.configs, [0], Path("unused"), preset=args.preset,
                         overrides=overrides, one_factor=args.one_factor)
        return
    if not hasattr(args, "config"):
        return
    if getattr(args, "fold", None) is not None:
        overrides.append(f"data.fold={args.fold}")
    if getattr(args, "condition", None):
        overrides.append(f"data.condition={args.condition}")
    load_config(args.config, overrides)


EXAMPLES = sorted(set(_doc_lines() + _help_lines()))


def test_examples_were_found():
    joined = "\n".join(EXAMPLES)
    for expected in ("spinegrade train --cache cache --out runs/v8/fold0 --fold 0",
                     "--set train.epochs=10", "spinegrade train-localizer --data D --out L "
                     "--set localizer.epochs=10", "spinegrade prepare data/ --out cache/ --set"):
        assert expected in joined, expected


@pytest.mark.parametrize("line", EXAMPLES)
def test_documented_command_line_parses_and_resolves(line, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/v8.yaml etc. as printed
    args = build_parser().parse_args(shlex.split(line)[1:])
    _resolve(args)
