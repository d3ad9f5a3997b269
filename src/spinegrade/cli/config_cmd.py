"""``spinegrade config``: print the resolved configuration."""

from __future__ import annotations

import argparse

from spinegrade.cli import add_config_args
from spinegrade.config import config_to_yaml, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the resolved config (file + overrides) as YAML",
        description="Load a config file, apply --set overrides, validate, and print the result.",
    )
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
