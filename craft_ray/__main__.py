"""``python -m craft_ray``: list the commands and whether each has landed in this version."""

from __future__ import annotations

import importlib.util
import sys

from craft_ray.cli import COMMANDS


def available(command: str) -> bool:
    """True when ``python -m craft_ray.<command>`` exists in this installation."""
    return importlib.util.find_spec(f"craft_ray.{command}") is not None


def main(argv: list[str] | None = None) -> int:
    """Print the command table; ``--help`` prints the same."""
    argv = sys.argv[1:] if argv is None else argv
    unknown = [a for a in argv if a not in ("-h", "--help")]
    print("craft_ray: Clinical Reward-Aligned Finetuning (CRAFT) of medical image generators on Ray\n")
    print("usage: python -m craft_ray.<command> [--help] [CONFIG.yaml] [key=value ...]\n")
    print("commands:")
    for name, what in COMMANDS.items():
        status = "" if available(name) else "  (not in this version yet)"
        print(f"  {name:<10} {what}{status}")
    if unknown:
        print(f"\nerror: 'python -m craft_ray' takes no arguments, got {' '.join(unknown)}; "
              "run python -m craft_ray.<command> --help", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
