"""Conventions shared by every ``python -m craft_ray.<cmd>`` entry point.

Every command accepts ``--help``, an optional config YAML, ``key=value`` overrides,
``--print-config`` (print the resolved YAML, exit 0) and ``--debug`` (full tracebacks).
A :class:`~craft_ray.errors.UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from omegaconf import DictConfig

from craft_ray.config import load_config, to_yaml
from craft_ray.errors import UserError

# Torch threads busy-wait on a loaded core; every process the project starts inherits this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS: dict[str, str] = {
    "train": "SFT baseline and CRAFT reward finetuning on Ray Train",
    "sweep": "Ray Tune sweep of CAS reward weights across modalities",
    "serve": "start the judges (enricher, checklist builder, checklist judge) on Ray Serve",
    "evaluate": "CAS, tail rate, audits, downstream classification and memorization reports",
    "data": "generate phantom datasets and write manifests from real dataset layouts",
    "knowledge": "validate, show and build clinical knowledge files",
    "bootstrap": "train the tiny models of the embedded default on the phantom world",
    "study": "blinded reader study web app",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors through UserError (exit 2, one line)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


def config_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the shared arguments: [CONFIG] [key=value ...] --print-config --debug."""
    parser = Parser(
        prog=f"python -m craft_ray.{prog}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional experiment YAML followed by dotted overrides, e.g. modality=derm train.sft_steps=50",
    )
    add_common_flags(parser)
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--print-config`` and ``--debug`` to a parser (or sub-parser)."""
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split positional args into (config file or None, overrides); the file must come first."""
    config_file: str | None = None
    overrides: list[str] = []
    for i, arg in enumerate(args):
        if "=" in arg:
            overrides.append(arg)
        elif i == 0 and config_file is None:
            if not arg.endswith((".yaml", ".yml")) and not os.path.exists(arg):
                raise UserError(f"{arg!r} is neither a YAML config file nor a key=value override")
            config_file = arg
        else:
            raise UserError(
                f"unexpected argument {arg!r}; expected [CONFIG.yaml] followed by key=value overrides"
            )
    return config_file, overrides


def resolve(ns: argparse.Namespace, schema: type | None = None) -> DictConfig:
    """Load the config named by a parsed namespace; prints and exits 0 on ``--print-config``."""
    config_file, overrides = split_config_args(ns.args)
    cfg = load_config(config_file, overrides) if schema is None else load_config(config_file, overrides, schema)
    if getattr(ns, "print_config", False):
        sys.stdout.write(to_yaml(cfg))
        raise SystemExit(0)
    return cfg


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Call ``main(argv)`` and exit: UserError -> one line + exit 2; ``--debug`` shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = main(argv)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
