"""``spinegrade config``: print the resolved configuration (or what differs from a base)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from spinegrade.cli import add_config_args
from spinegrade.config import config_to_dict, config_to_yaml, load_config, resolve_config_path

_KEY = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the resolved config (file + overrides) as YAML",
        description="Load a config file, apply --set overrides, validate, and print the result. "
                    "--diff prints only the values that differ from another config (v8 by "
                    "default), each with the comment written above it in the config files "
                    "(for v4-v7: the plan's words).",
    )
    add_config_args(p)
    p.add_argument("--diff", nargs="?", const="v8", default=None, metavar="BASE",
                   help="show only the differences from BASE (default: v8)")
    p.set_defaults(func=run)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def key_comments(path: Path) -> dict[str, str]:
    """``section.key`` -> the comment lines right above it, for a file and its ``base:`` chain."""
    out: dict[str, str] = {}
    section, pending = "", []
    text = path.read_text()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        m = _KEY.match(line)
        if m and not m.group(1):
            section = m.group(2)
        elif m and pending:
            out[f"{section}.{m.group(2)}"] = " ".join(pending)
        pending = [] if stripped else pending
    base = re.search(r"^base:\s*(\S+)", text, re.M)
    if base:
        parent = resolve_config_path(path.parent / base.group(1))
        out = {**key_comments(parent), **out}
    return out


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.diff is None:
        print(config_to_yaml(cfg), end="")
        return 0
    base = _flatten(config_to_dict(load_config(args.diff)))
    comments = key_comments(resolve_config_path(args.config))
    print(f"# {cfg.name} vs {args.diff}: {'value in ' + args.diff + ' -> value here'}")
    for key, value in _flatten(config_to_dict(cfg)).items():
        if key in ("name", "description") or base.get(key) == value:
            continue
        note = f"   # {comments[key]}" if key in comments else ""
        print(f"{key}: {base.get(key)!r} -> {value!r}{note}")
    return 0
