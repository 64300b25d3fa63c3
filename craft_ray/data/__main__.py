"""``python -m craft_ray.data``: generate phantom datasets and write manifests from real dataset layouts."""

from __future__ import annotations

import argparse
from collections import Counter

from craft_ray.cli import Parser, run
from craft_ray.data.adapters import add_adapter_commands, parse_split
from craft_ray.data.manifest import read_manifest
from craft_ray.data.phantom.export import write_dataset

EPILOG = """examples:
  python -m craft_ray.data phantom --modality cxr --n 1000 --out data/cxr_phantom
  python -m craft_ray.data phantom --modality histo --n 200 --out /tmp/histo --size 128 --split train=0.9,test=0.1
  python -m craft_ray.data ham10000 --root ~/data/HAM10000 --out data/ham/manifest.csv
"""


def _cmd_phantom(ns: argparse.Namespace) -> int:
    manifest = write_dataset(ns.out, ns.modality, ns.n, size=ns.size, seed=ns.seed, split=ns.split,
                             overwrite=ns.overwrite)
    rows = read_manifest(manifest, ns.modality, "phantom").rows
    splits = Counter(r.split for r in rows)
    shown = ", ".join(f"{name} {splits[name]}" for name in ("train", "val", "test") if splits[name])
    print(f"wrote {len(rows)} {ns.modality} phantoms ({ns.size} px, seed {ns.seed}; {shown}) -> {manifest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m craft_ray.data`` parser: ``phantom`` plus one subcommand per real dataset."""
    parser = Parser(
        prog="python -m craft_ray.data",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantom", help="generate a phantom dataset: PNGs + manifest.csv with ground-truth columns",
                       description="Generate phantom images of one modality (labels cycle through its phantom "
                                   "label set) with their ground-truth feature values as manifest columns.")
    p.add_argument("--modality", required=True, help="cxr | derm | fundus | histo")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="output folder (images/<label>/*.png and manifest.csv)")
    p.add_argument("--size", type=int, default=64, help="image side in px (default: 64; features scale with it)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; image i depends only on (seed, i)")
    p.add_argument("--split", type=parse_split, default=parse_split("train=0.8,val=0.1,test=0.1"),
                   help="split fractions, stratified by label (default: train=0.8,val=0.1,test=0.1)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already has a manifest")
    # SUPPRESS: an unset sub-command flag must not overwrite a --debug given before the sub-command.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    p.set_defaults(func=_cmd_phantom)

    add_adapter_commands(sub)
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``python -m craft_ray.data``; returns the exit code."""
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    run(main)
