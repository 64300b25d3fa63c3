"""``python -m craft_ray.train``: SFT baseline and CRAFT reward finetuning on Ray Train.

The stages (DESIGN.md, "Training"): ``sft`` (LoRA adaptation with the diffusion loss),
``craft`` (DRaFT-K reward finetuning on the CAS dimensions) and ``all`` (both, then evaluation).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from craft_ray.cli import config_parser, resolve, run
from craft_ray.config import to_yaml
from craft_ray.errors import UserError

# stage -> the stages it runs; a stage is listed in STAGES only once its code has landed.
PLAN: dict[str, tuple[str, ...]] = {"sft": ("sft",), "craft": ("craft",), "all": ("sft", "craft", "evaluate")}
STAGES: dict[str, object] = {}

EPILOG = """examples:
  python -m craft_ray.train                                  # embedded default: tiny profile, phantom cxr
  python -m craft_ray.train modality=derm train.sft_steps=50
  python -m craft_ray.train experiment.yaml --print-config
  ray job submit --working-dir . -- python -m craft_ray.train modality=fundus
"""


def stage_table() -> str:
    """One line per stage saying whether it exists in this version."""
    lines = ["stages:"]
    for stage in ("sft", "craft", "evaluate"):
        state = "available" if stage in STAGES else "not in this version yet"
        lines.append(f"  {stage:<9} {state}")
    return "\n".join(lines)


def train(cfg: DictConfig) -> int:
    """Run the stages of ``cfg.stage``; refuses clearly when one of them has not landed."""
    missing = [s for s in PLAN[cfg.stage] if s not in STAGES]
    if missing:
        raise UserError(
            f"stage {cfg.stage!r} needs {', '.join(missing)}, which this version of craft_ray does not have yet; "
            "see the README's Status section (python -m craft_ray.train --list-stages)"
        )
    for stage in PLAN[cfg.stage]:
        STAGES[stage](cfg)  # type: ignore[operator]
    return 0


def main(argv: list[str]) -> int:
    """Parse the CLI, print the resolved config and the stage plan, run the stages."""
    parser = config_parser("train", __doc__.splitlines()[0], EPILOG)
    parser.add_argument("--list-stages", action="store_true", help="print the resolved config and the stages, exit")
    ns = parser.parse_args(argv)
    cfg = resolve(ns)
    print(to_yaml(cfg), end="")
    print(stage_table())
    if ns.list_stages:
        return 0
    return train(cfg)


if __name__ == "__main__":
    run(main, sys.argv[1:])
