"""The ``spinegrade`` command line: one module per subcommand.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments. The CLI only parses, loads the config
and calls one function; the work lives in ``engine`` and ``data``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

from spinegrade import __version__
from spinegrade.config import ConfigError
from spinegrade.errors import UserError

# (module, subcommand) in the order `spinegrade --help` lists them.
COMMANDS: tuple[str, ...] = (
    "demo",
    "synth",
    "inspect",
    "prepare",
    "gallery",
    "train",
    "evaluate",
    "calibrate",
    "train_localizer",
    "predict",
    "score",
    "ablate",
    "cv",
    "config_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="spinegrade",
        description=(
            "Grade lumbar spinal canal stenosis, neural foraminal narrowing and subarticular "
            "stenosis (Normal/Mild, Moderate, Severe) per disc level from MRI DICOM series "
            "in the RSNA 2024 Lumbar Spine format."
        ),
        epilog="Run 'spinegrade COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"spinegrade {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"spinegrade.cli.{name}")
        except ModuleNotFoundError as e:
            # A command whose module is not written yet is simply not offered.
            if e.name == f"spinegrade.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def add_config_args(parser: argparse.ArgumentParser, default: str = "v8",
                    example: str = "train.batch_size=8") -> None:
    """Add the shared ``--config`` / ``--set`` options to a subcommand.

    ``example`` is the override the help shows: one this command reads, valid with its
    default config (tests/test_doc_examples.py resolves it).
    """
    parser.add_argument(
        "--config", default=default,
        help=f"YAML config file, or the name of a packaged one (default: {default})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help=f"override one config value, e.g. --set {example} (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spinegrade`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError) as e:
        print(f"spinegrade {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A user path that vanished or cannot be read/written mid-run: a message, not a trace.
        where = f"{e.filename}: " if e.filename else ""
        print(f"spinegrade {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        logging.getLogger(__name__).debug("OSError", exc_info=True)
        return 2
    except KeyboardInterrupt:
        again = resume_command(argv, getattr(args, "resume_flag", None),
                               getattr(args, "restart_flag", None))
        print(f"\nspinegrade {args.command}: interrupted; to resume, run:\n  {again}",
              file=sys.stderr)
        return 130


def resume_command(argv: list[str], flag: str | None = None, restart: str | None = None) -> str:
    """The exact command line that continues an interrupted one.

    Args:
        argv: the interrupted command's arguments.
        flag: the command's resume option (``--resume``), added if missing.
        restart: the command's restart option, dropped: rerun, it would start over again.
    """
    args = [a for a in argv if a != restart] if restart else list(argv)
    if flag and flag not in args:
        args.append(flag)
    return "spinegrade " + shlex.join(args)


if __name__ == "__main__":
    sys.exit(main())
