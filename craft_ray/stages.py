"""The training stages as the driver sees them, without torch: what a stage's checkpoints and MLflow run
hold, its steps and images per micro-step, and the line that sums up its metrics. The driver
(:mod:`craft_ray.train`) imports this instead of :mod:`craft_ray.training`, which loads diffusers and
peft; the Train workers load those.
"""

from __future__ import annotations

import math
from typing import Any

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
INIT_LORA_FILE = "init_lora.safetensors"  # CRAFT's checkpoints: the LoRA it started from (the SFT LoRA)
# MLflow tag rank 0 sets on a stage's run once its final LoRA is logged there: the driver's token for this run
LORA_TOKEN_TAG = "craft_ray.lora_token"


def stage_steps(cfg: Any, stage: str) -> int:
    """Optimizer steps of a stage."""
    return int(cfg.train.sft_steps if stage == "sft" else cfg.train.craft_steps)


def images_per_micro_step(cfg: Any, stage: str) -> int:
    """Images one worker trains on per micro-step: SFT's real batch; CRAFT's generated images (DRaFT's
    batch and the preference term's candidates; check_craft_objective refuses a CRAFT with neither)."""
    b, r = int(cfg.train.batch_size), cfg.reward
    if stage == "sft":
        return b
    return (b if float(r.draft_weight) > 0 else 0) + (
        (int(r.preference_prompts) or b) * int(r.preference_candidates) if float(r.preference_weight) > 0 else 0)


def describe_metrics(metrics: dict[str, float]) -> str:
    """One line of the key final metrics of a stage."""
    keys = ("eval/train_cas", "eval/train_tail_rate", "eval/ood_cas", "eval/ood_tail_rate", "eval/oracle_label")
    return ", ".join(f"{k.removeprefix('eval/')} {metrics[k]:.3f}" for k in keys if k in metrics
                     and isinstance(metrics[k], float) and math.isfinite(metrics[k]))
