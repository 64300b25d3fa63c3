"""Training: the per-worker loop (exact resume, the hacking guard) and the Ray Train driver end to end."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from craft_ray import training
from craft_ray.config import load_config
from craft_ray.errors import UserError
from craft_ray.models.diffusion import LORA_WEIGHT_NAME
from tests.conftest import MICRO_OVERRIDES

# The DESIGN's DRaFT-K (its reward gradient and the real-batch anchor), whatever the profile sets (the tiny
# profile's preference term has its own tests)
DRAFT = ("reward.draft_weight=1", "reward.preference_weight=0", "reward.beta=0.5")


def micro_cfg(world: Path, tmp: Path, *extra: str):
    return load_config(None, [f"tiny_world={world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp / 'cache'}",
                              f"output_dir={tmp / 'runs'}", f"ray.storage_path={tmp / 'ray'}",
                              f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra])


def _stage(cfg, stage: str, root: Path, **extra) -> training.StageState:
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": stage, "output_dir": str(root), **extra}
    return training.run_stage(config, training.LocalSession(root / f"ckpt-{stage}", keep=10))


# ----------------------------------------------------------------------------------------------- pure parts


def test_warmup_cosine_schedule():
    f = training.warmup_cosine(4, 20)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.5)
    assert f(20) == pytest.approx(0.0, abs=1e-12)


def test_hacking_guard_needs_patience_consecutive_divergences():
    g = training.HackingGuard(patience=2, watch=["cas"])
    assert g.update(10, 0.50, {"cas": 0.40}) == (True, False)
    assert g.update(20, 0.55, {"cas": 0.38}) == (False, False)  # one divergence
    assert g.update(30, 0.54, {"cas": 0.37}) == (False, False)  # train CAS fell: the streak is broken
    assert g.update(40, 0.60, {"cas": 0.36}) == (False, False)
    assert g.update(50, 0.65, {"cas": 0.35}) == (False, True)  # two in a row
    assert g.best_step == 10 and g.best_ood == pytest.approx(0.40)
    assert g.triggered_at == 50 and g.triggered_by == "cas"


def test_hacking_guard_watching_realism_catches_a_hack_the_cas_hides():
    """Measured on the tiny world's cxr (240 CRAFT steps from the SFT LoRA, evaluations every 20 steps):
    the training CAS rises, the out-of-family label score rises and its realism falls, so the
    out-of-family CAS does not fall. Watching CAS alone misses it; watching realism catches it."""
    evals = [  # step, training CAS, out-of-family CAS, out-of-family realism
        (20, 0.473, 0.496, 0.099), (40, 0.471, 0.513, 0.081), (60, 0.486, 0.528, 0.060),
        (80, 0.496, 0.524, 0.058), (100, 0.527, 0.540, 0.054)]
    cas_only = training.HackingGuard(patience=3, watch=["cas"])
    both = training.HackingGuard(patience=3, watch=["cas", "realism"])
    for step, train_cas, ood_cas, ood_realism in evals:
        ood = {"cas": ood_cas, "realism": ood_realism}
        assert cas_only.update(step, train_cas, ood)[1] is False
        assert both.update(step, train_cas, ood)[1] is (step == 100)
    assert both.triggered_at == 100 and both.triggered_by == "realism" and both.diverging() == ["realism"]
    assert cas_only.triggered_at is None and both.best_step == 100
    # the state survives the checkpoint's JSON round trip, so a resumed run keeps its streak
    again = training.HackingGuard(**json.loads(json.dumps(asdict(both))))
    assert again.diverging() == ["realism"] and again.best_step == 100
    assert again.update(120, 0.540, {"cas": 0.527, "realism": 0.050}) == (False, True)
    # a checkpoint from before the guard watched dimensions (out-of-family CAS as a plain number) resumes
    legacy = training.HackingGuard(patience=1, watch=["cas", "realism"], history=[[10, 0.50, 0.45]], best_step=10,
                                   best_ood=0.45)
    assert legacy.update(20, 0.55, {"cas": 0.44, "realism": 0.1}) == (False, True)
    assert legacy.diverging() == ["cas"]  # realism has no earlier value to fall from


def test_hacking_guard_is_quiet_while_the_training_cas_does_not_rise():
    g = training.HackingGuard(patience=2, watch=["cas", "realism"])
    for step, train_cas in ((1, 0.50), (2, 0.50), (3, 0.49), (4, 0.48)):
        assert g.update(step, train_cas, {"cas": 0.5 - step / 100, "realism": 0.1 - step / 100})[1] is False


@pytest.mark.parametrize("kwargs", [{"watch": []}, {"watch": ["cas", "sharpness"]}, {"patience": 0}])
def test_hacking_guard_refuses_bad_settings(kwargs):
    with pytest.raises(UserError, match="hacking"):
        training.HackingGuard(**{"patience": 2, **kwargs})


def test_step_batches_are_disjoint_across_ranks_and_a_function_of_the_step(micro_world, tmp_path):
    from craft_ray.data.dataset import ImageDataset, load_dataset

    cfg = micro_cfg(micro_world, tmp_path)
    ds = ImageDataset(load_dataset(cfg), "train", 32)
    r0 = training.StepBatches(ds, 4, 0, 2, seed=3)
    r1 = training.StepBatches(ds, 4, 1, 2, seed=3)
    seen = [i for m in range(6) for r in (r0, r1) for i in _indices(r, m)]
    assert len(seen) == 48 and len(set(seen)) == 48  # one epoch, every image exactly once
    again = training.StepBatches(ds, 4, 1, 2, seed=3)
    assert torch.equal(again.batch(5)["pixels"], r1.batch(5)["pixels"])


def _indices(batches: training.StepBatches, m: int) -> list[int]:
    n = len(batches.dataset)
    first = (m * batches.world + batches.rank) * batches.batch_size
    return [int(batches._perm_of(j // n)[j % n]) for j in range(first, first + batches.batch_size)]


# ----------------------------------------------------------------------------------------------- the loop


def test_sft_then_craft_in_process_and_exact_resume(micro_world, tmp_path):
    cfg = micro_cfg(micro_world, tmp_path, "train.sft_steps=4", "train.craft_steps=2", "train.checkpoint_every=2",
                    "train.eval_every=2")
    root = tmp_path / "run"
    state = _stage(cfg, "sft", root)
    assert state.step == 4 and state.images_seen == 16
    sft_lora = load_file(str(root / "sft" / LORA_WEIGHT_NAME))
    assert sft_lora and all(k.startswith("unet.") for k in sft_lora)
    assert any(float(v.abs().sum()) > 0 for k, v in sft_lora.items() if "lora.up" in k)  # B moved away from 0
    ckpts = sorted((root / "ckpt-sft").glob("checkpoint_*"))
    assert [c.name for c in ckpts] == ["checkpoint_00000001", "checkpoint_00000002"]  # numbered in order
    assert json.loads((ckpts[-1] / "state.json").read_text())["step"] == 4

    # Resume from step 2: the last two steps must reproduce the uninterrupted run exactly.
    shutil.rmtree(ckpts[-1])
    resumed = _stage(cfg, "sft", root)
    assert resumed.step == 4 and resumed.images_seen == 16
    again = load_file(str(root / "sft" / LORA_WEIGHT_NAME))
    for key, value in sft_lora.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)

    craft = _stage(cfg, "craft", root, init_lora=str(root / "sft"))
    assert craft.step == 2
    progress = training.read_progress(root, "craft")
    assert progress["step"] == 2 and progress["total"] == 2


def test_sft_then_craft_in_one_run_equals_two_runs_and_resumes_without_sft(micro_world, tmp_path):
    """stage=all trains both stages in one worker group (training.run_stages): the LoRAs are bit-identical
    to two separate stages; CRAFT's checkpoints hold the SFT LoRA, so a restart in CRAFT skips SFT."""
    # the tiny profile's CRAFT, the preference term: its reference is the LoRA CRAFT starts from
    cfg = micro_cfg(micro_world, tmp_path, "train.sft_steps=2", "train.craft_steps=2", "train.checkpoint_every=1",
                    "train.eval_every=2")
    assert float(cfg.reward.preference_weight) > 0
    two = tmp_path / "two"
    _stage(cfg, "sft", two)
    _stage(cfg, "craft", two, init_lora=str(two / "sft"))

    one = tmp_path / "one"
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stages": ["sft", "craft"], "output_dir": str(one)}
    session = training.LocalSession(one / "ckpt-all", keep=10)
    states = training.run_stages(config, session)
    assert {k: v.step for k, v in states.items()} == {"sft": 2, "craft": 2}
    for stage in ("sft", "craft"):
        a, b = load_file(str(two / stage / LORA_WEIGHT_NAME)), load_file(str(one / stage / LORA_WEIGHT_NAME))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    ckpts = sorted((one / "ckpt-all").glob("checkpoint_*"))
    stages = [json.loads((c / "state.json").read_text())["stage"] for c in ckpts]
    assert stages == ["sft", "sft", "craft", "craft"]  # numbered in the order written
    sft = load_file(str(one / "sft" / LORA_WEIGHT_NAME))
    held = load_file(str(ckpts[-1] / training.INIT_LORA_FILE))
    assert all(torch.equal(sft[k], held[k]) for k in sft)

    # a restart after CRAFT's first checkpoint: SFT is not trained again, CRAFT continues exactly
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(one / "sft")
    reports = len(session.reports)
    states = training.run_stages(config, session)
    assert list(states) == ["craft"] and states["craft"].step == 2
    assert [r["step"] for r in session.reports[reports:]] == [2]
    assert not (one / "sft").exists()
    a, b = load_file(str(two / "craft" / LORA_WEIGHT_NAME)), load_file(str(one / "craft" / LORA_WEIGHT_NAME))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_sft_lora_is_evaluated_once_rank_0_has_logged_it_to_mlflow(micro_world, tmp_path, capsys):
    """stage=all: the driver's watcher submits the SFT LoRA's evaluation when SFT's MLflow run carries this
    run's token, with the LoRA read from MLflow; another run's token (or none) leaves it for after CRAFT."""
    from safetensors.torch import save_file

    from craft_ray import tracking, train

    cfg = micro_cfg(micro_world, tmp_path, "stage=all")
    runs = tracking.stage_runs(cfg, ("sft", "craft"))
    lora = {"unet.down.lora.down.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(lora, str(tmp_path / LORA_WEIGHT_NAME))
    sft_run = tracking.StageTracker(cfg.tracking.tracking_uri, runs["sft"])
    sft_run.log_artifact(tmp_path / LORA_WEIGHT_NAME, "lora")
    class Recorder:  # a FinalEvaluation that records what is submitted instead of starting Ray actors
        def __init__(self):
            self.submitted = []

        def submit(self, key, loras, workers=None):
            self.submitted.append((key, loras, workers))

    evaluation = Recorder()
    sft_run.set_tag(training.LORA_TOKEN_TAG, "an earlier run")
    with train._evaluate_sft_once_logged(cfg, runs["sft"], "this run", evaluation, poll_s=0.1):
        time.sleep(0.5)
    assert evaluation.submitted == []  # evaluated after CRAFT, from its checkpoint

    with train._evaluate_sft_once_logged(cfg, runs["sft"], "this run", evaluation, poll_s=0.1):
        sft_run.set_tag(training.LORA_TOKEN_TAG, "this run")
        time.sleep(1.0)
    [(key, loras, workers)] = evaluation.submitted
    assert key == "sft" and workers == cfg.train.sft_eval_workers == 1
    assert list(loras) == ["sft"] and torch.equal(loras["sft"]["unet.down.lora.down.weight"],
                                                  lora["unet.down.lora.down.weight"])
    assert "the SFT LoRA's final evaluation started, beside CRAFT" in capsys.readouterr().out


def test_final_evaluator_connects_to_the_judges_once_and_again_after_a_restart(micro_world, tmp_path, monkeypatch):
    """The evaluation actor connects when the driver asks (connect) or, failing that, at its first
    evaluation that uses the judges: a restarted actor runs only __init__, so it reconnects there."""
    from craft_ray import evaluate as ev
    from craft_ray import train
    from craft_ray.judges import client

    calls = []
    monkeypatch.setattr(client, "connect_or_none", lambda cfg: calls.append(1) or "judge client")
    monkeypatch.setattr(ev, "evaluate_lora", lambda cfg, lora, **kw: ({"judge": kw["judge"]}, {"train": 0.5}))
    cfg = OmegaConf.to_container(micro_cfg(micro_world, tmp_path), resolve=True)

    actor = train.FinalEvaluator(cfg)
    scores, taus = actor.evaluate({"sft": {}}, ["nodule"], use_judges=False)
    assert scores == {"sft": {"judge": None}} and taus == {"train": 0.5} and calls == []
    actor.connect()
    actor.evaluate({"sft": {}}, ["nodule"], use_judges=True)
    assert calls == [1]  # connected once, by the driver's call

    restarted = train.FinalEvaluator(cfg)
    scores, _ = restarted.evaluate({"craft": {}}, ["nodule"], use_judges=True)
    assert scores == {"craft": {"judge": "judge client"}} and calls == [1, 1]


def test_sft_evaluates_every_sft_eval_every_steps(micro_world, tmp_path, monkeypatch):
    steps = []
    evaluate = training.periodic_evaluation

    def spy(model, cfg, setups, knowledge, judge, tracker, step, stage):
        steps.append((stage, step))
        return evaluate(model, cfg, setups, knowledge, judge, tracker, step, stage)

    monkeypatch.setattr(training, "periodic_evaluation", spy)
    cfg = micro_cfg(micro_world, tmp_path, "train.sft_steps=5", "train.craft_steps=2", "train.eval_every=1",
                    "train.sft_eval_every=2", "cas.use_judge=false", *DRAFT)
    root = tmp_path / "run"
    _stage(cfg, "sft", root)
    _stage(cfg, "craft", root, init_lora=str(root / "sft"))
    assert steps == [("sft", 2), ("sft", 4), ("sft", 5), ("craft", 1), ("craft", 2)]  # and always the last step


def test_craft_stage_trains_with_the_configured_reward_form_and_shifts(micro_world, tmp_path):
    from safetensors.torch import load_file

    from craft_ray.models.diffusion import DiffusionModel

    rewards, loras = {}, {}
    cases = {("cas", 0): [], ("log", 0): [], ("cas", 2): [], ("cas", 2, "sigma"): ["reward.grad_sigma=2"],
             ("cas", 0, "trailing"): ["sampling.timestep_spacing=trailing"]}
    for case, extra in cases.items():
        form, shifts = case[:2]
        tag = "-".join(map(str, case))
        cfg = micro_cfg(micro_world, tmp_path / tag, "train.craft_steps=1", f"reward.form={form}",
                        f"reward.shifts={shifts}", *DRAFT, "reward.beta=0", *extra)
        root = tmp_path / tag / "run"
        DiffusionModel.from_config(cfg.model).save_lora(root / "init" / LORA_WEIGHT_NAME)  # a zero LoRA to start from
        session = training.LocalSession(root / "ckpt-craft")
        training.run_stage({"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": "craft",
                            "output_dir": str(root), "init_lora": str(root / "init")}, session)
        rewards[case] = [r["reward"] for r in session.reports if "reward" in r]
        loras[case] = load_file(str(root / "craft" / LORA_WEIGHT_NAME))
    # a smoothed gradient leaves the reward's value as it is but changes the update; trailing spacing
    # samples other images
    assert rewards["cas", 2, "sigma"] == pytest.approx(rewards["cas", 2], abs=1e-6)
    assert any(not torch.allclose(loras["cas", 2, "sigma"][k], loras["cas", 2][k]) for k in loras["cas", 2])
    assert rewards["cas", 0, "trailing"] and rewards["cas", 0, "trailing"] != pytest.approx(rewards["cas", 0], abs=1e-4)
    assert rewards["cas", 0] and all(0 <= r <= 1 for r in rewards["cas", 0])  # the CAS: a weighted mean in [0, 1]
    # the same sampled images (same seed and step), scored on shifted copies: another reward, still a CAS
    assert rewards["cas", 2] and all(0 <= r <= 1 for r in rewards["cas", 2]) and rewards["cas", 2] != rewards["cas", 0]
    assert rewards["log", 0] and all(r < 0 for r in rewards["log", 0])  # weighted logs of values below 1


def test_craft_without_an_sft_lora_is_refused(micro_world, tmp_path):
    cfg = micro_cfg(micro_world, tmp_path, "train.craft_steps=1")
    with pytest.raises(UserError, match="starts from an SFT LoRA"):
        _stage(cfg, "craft", tmp_path / "run")


def test_craft_reward_gradient_reaches_lora_only(micro_world, tmp_path):
    from craft_ray import evaluate as ev
    from craft_ray.data.dataset import ImageDataset, load_dataset
    from craft_ray.models.diffusion import DiffusionModel
    from craft_ray.rewards import make_reward

    cfg = micro_cfg(micro_world, tmp_path, *DRAFT)
    model = DiffusionModel.from_config(cfg.model)
    know = ev.load_knowledge_for(cfg)
    setup = ev.ScoringSetup.build(cfg, "train", know)
    ds = ImageDataset(load_dataset(cfg), "train", 32)
    real = training.StepBatches(ds, 4, 0, 1, seed=0)
    # B = 0 at init would zero the gradient of A; give the adapter a non-trivial start.
    for p in model.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    loss, parts = training._craft_loss(model, cfg, make_reward(dict(cfg.reward.weights), setup.scorer),
                                       training.craft_prompt_pool(cfg, know), know.labels(), real, 0,
                                       torch.Generator().manual_seed(0), 0, 1)
    loss.backward()
    assert {"reward", "diffusion_loss", "reward_label", "reward_realism"} <= set(parts)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.trainable_parameters())
    frozen = [p for p in model.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is None for p in setup.evaluator.model.parameters())


def _brightness_reward(images, prompts, metadata, generator=None):
    """A reward that ranks images by mean brightness (test double for the training evaluator)."""
    value = images.mean(dim=(1, 2, 3))
    return value, {"brightness": value.detach()}


def _preference_setup(micro_world, tmp_path, *extra):
    from craft_ray import evaluate as ev
    from craft_ray.data.dataset import ImageDataset, load_dataset
    from craft_ray.models.diffusion import DiffusionModel

    cfg = micro_cfg(micro_world, tmp_path, "reward.draft_weight=0", "reward.preference_weight=1", "reward.beta=0",
                    *extra)
    model = DiffusionModel.from_config(cfg.model)
    for p in model.trainable_parameters():  # a non-trivial LoRA to start from (B = 0 would zero A's gradient)
        torch.nn.init.normal_(p, std=0.05)
    reference = {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    know = ev.load_knowledge_for(cfg)
    real = training.StepBatches(ImageDataset(load_dataset(cfg), "train", 32), 4, 0, 1, seed=0)
    return cfg, model, reference, (training.craft_prompt_pool(cfg, know), know.labels(), real)


@pytest.mark.parametrize("pairs", ["extremes", "all"])
def test_preference_term_is_log2_at_the_reference_and_a_step_prefers_the_winners(micro_world, tmp_path, pairs):
    cfg, model, reference, (pool, labels, real) = _preference_setup(micro_world, tmp_path,
                                                                    f"reward.preference_pairs={pairs}")

    def loss_at(seed):
        return training._craft_loss(model, cfg, _brightness_reward, pool, labels, real, 0,
                                    torch.Generator().manual_seed(seed), 0, 1, reference)

    loss, parts = loss_at(0)
    # the LoRA is the reference: every pair's margin is 0, the loss is log 2
    assert parts["preference_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert parts["preference_reward_gap"] > 0 and "reward" not in parts and "diffusion_loss" not in parts
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    loss.backward()
    frozen = [p for p in model.unet.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    opt.step()
    # the same pairs, noise and timesteps again: the step lowered the loss; the model now favours the winners
    _, after = loss_at(0)
    assert after["preference_loss"] < np.log(2) - 1e-4 and after["preference_accuracy"] > 0.5
    with pytest.raises(UserError, match="reference LoRA"):
        training._craft_loss(model, cfg, _brightness_reward, pool, labels, real, 0, torch.Generator(), 0, 1, None)


def test_all_pairs_of_two_candidates_is_the_best_against_the_worst(micro_world, tmp_path):
    """With 2 candidates the one pair is the best against the worst: the two settings compute the same loss
    and gradient; with 4 candidates "all" scores 6 pairs per prompt and differs."""
    def loss_and_grad(pairs, candidates):
        torch.manual_seed(0)  # the same starting LoRA each time
        cfg, model, reference, (pool, labels, real) = _preference_setup(
            micro_world, tmp_path, f"reward.preference_pairs={pairs}", f"reward.preference_candidates={candidates}",
            "reward.preference_prompts=2", "reward.preference_timesteps=2")
        for p in model.trainable_parameters():  # away from the reference, so the margins are not 0
            p.data.add_(0.01 * torch.randn_like(p))
        loss, _ = training._craft_loss(model, cfg, _brightness_reward, pool, labels, real, 0,
                                       torch.Generator().manual_seed(5), 0, 1, reference)
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten() for p in model.trainable_parameters()])

    (l_ext, g_ext), (l_all, g_all) = loss_and_grad("extremes", 2), loss_and_grad("all", 2)
    assert l_all == l_ext and torch.equal(g_all, g_ext)
    assert loss_and_grad("all", 4)[0] != loss_and_grad("extremes", 4)[0]


@pytest.mark.slow
def test_preference_training_follows_the_rewards_ranking():
    """On the shipped tiny world, ten steps of the preference term alone, with a reward that ranks by
    brightness, brighten the model's samples (measured: mean pixel -0.496 -> -0.451)."""
    from craft_ray import evaluate as ev
    from craft_ray.models.diffusion import DiffusionModel

    cfg = load_config(None, ["reward.draft_weight=0", "reward.preference_weight=1", "reward.beta=0",
                             "reward.preference_pairs=extremes", "reward.preference_prompts=0",
                             "train.batch_size=4", "sampling.num_steps=4"])
    model = DiffusionModel.from_config(cfg.model)  # the base model: B = 0, so the reference is the base model
    reference = {n: p.detach().clone() for n, p in model.unet.named_parameters() if p.requires_grad}
    know = ev.load_knowledge_for(cfg)
    pool = training.craft_prompt_pool(cfg, know)
    _, prompts, seeds = ev.eval_plan(cfg, 4, seed_offset=7)
    before = float(ev.generate(model, prompts, seeds, cfg.sampling, 64).mean())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    accuracy = []
    for step in range(10):
        loss, parts = training._craft_loss(model, cfg, _brightness_reward, pool, know.labels(), None, step,
                                           torch.Generator().manual_seed(step), 0, 1, reference)
        loss.backward()
        opt.step()
        opt.zero_grad()
        accuracy.append(parts["preference_accuracy"])
    after = float(ev.generate(model, prompts, seeds, cfg.sampling, 64).mean())
    assert after > before + 0.02
    assert np.mean(accuracy[5:]) > 0.75  # fresh pairs each step: the model ranks them as the reward does


def test_craft_stage_with_draft_and_the_preference_term_trains_and_resumes_exactly(micro_world, tmp_path):
    from craft_ray.models.diffusion import DiffusionModel

    cfg = micro_cfg(micro_world, tmp_path, "train.craft_steps=2", "train.checkpoint_every=1", "train.eval_every=2",
                    "reward.draft_weight=1", "reward.preference_weight=1", "reward.preference_candidates=2",
                    "reward.preference_prompts=2", "reward.preference_timesteps=2")
    root = tmp_path / "run"
    init = DiffusionModel.from_config(cfg.model)
    for p in init.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    init.save_lora(root / "init" / LORA_WEIGHT_NAME)
    session = training.LocalSession(root / "ckpt-craft", keep=10)
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": "craft", "output_dir": str(root),
              "init_lora": str(root / "init")}
    training.run_stage(config, session)
    steps = [r for r in session.reports if "preference_loss" in r]
    assert steps and all(0 <= r["preference_accuracy"] <= 1 and "reward" in r for r in steps)
    final = load_file(str(root / "craft" / LORA_WEIGHT_NAME))
    # resume from step 1: the reference is the starting LoRA again, so the second step is the same
    shutil.rmtree(sorted((root / "ckpt-craft").glob("checkpoint_*"))[-1])
    training.run_stage(config, training.LocalSession(root / "ckpt-craft", keep=10))
    again = load_file(str(root / "craft" / LORA_WEIGHT_NAME))
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_craft_with_the_preference_term_on_two_ddp_workers(micro_world, tmp_path, ray_local, capsys):
    from craft_ray import train

    args = [f"tiny_world={micro_world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'runs'}", f"ray.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "name=t-pref-ddp", "cas.use_judge=false",
            "train.sft_steps=2", "train.craft_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
            "train.num_workers=2", "train.cpus_per_worker=0.25", "reward.draft_weight=0",
            "reward.preference_weight=1", "reward.preference_prompts=2", "reward.beta=0"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "preference term: 2 prompts per worker and micro-step, every two of 4 samples (6 pairs each)" in out
    assert "SFT vs CRAFT" in out
    # both stages in one Ray Train run; its last checkpoint is CRAFT's and holds the SFT LoRA too
    last = sorted(p.parent for p in (tmp_path / "ray" / "t-pref-ddp-all").glob("checkpoint_*/state.json"))[-1]
    state = json.loads((last / "state.json").read_text())
    # 2 steps x 2 workers x (2 prompts x 4 candidates) generated images
    assert state["stage"] == "craft" and state["step"] == 2 and state["images_seen"] == 2 * 2 * 8
    assert (last / training.INIT_LORA_FILE).is_file()
    assert "[craft] 2 steps; effective batch 16 = 8 per worker x 1 accumulation x 2 worker(s)" in out


@pytest.mark.parametrize("override", ["reward.preference_candidates=1", "reward.preference_beta=0",
                                      "reward.preference_weight=-1", "reward.preference_prompts=-1",
                                      "reward.preference_timesteps=0", "reward.preference_pairs=best"])
def test_bad_preference_settings_are_refused(micro_world, tmp_path, override):
    cfg = micro_cfg(micro_world, tmp_path, "reward.preference_weight=1", override)
    with pytest.raises(UserError, match="reward.preference"):
        training.check_craft_objective(cfg.reward)


@pytest.mark.parametrize(("overrides", "stage", "images"), [
    ((), "sft", 4),  # the real batch
    (DRAFT, "craft", 4),  # DRaFT's sampled batch
    (("reward.draft_weight=0", "reward.preference_weight=1", "reward.preference_prompts=2"), "craft", 8),
    (("reward.draft_weight=0", "reward.preference_weight=1", "reward.preference_prompts=0"), "craft", 16),
    (("reward.draft_weight=1", "reward.preference_weight=1", "reward.preference_prompts=3",
      "reward.preference_candidates=2"), "craft", 4 + 6),
])
def test_images_per_micro_step_counts_what_the_stage_trains_on(micro_world, tmp_path, overrides, stage, images):
    cfg = micro_cfg(micro_world, tmp_path, *overrides)  # train.batch_size=4
    assert training.images_per_micro_step(cfg, stage) == images


def test_bad_final_evaluation_workers_are_refused_before_ray_starts(micro_world, tmp_path, monkeypatch):
    from craft_ray import train

    def no_ray(cfg):
        raise AssertionError("Ray started")

    monkeypatch.setattr(train, "init_ray", no_ray)
    with pytest.raises(UserError, match="train.final_eval_workers=0"):
        train.train(micro_cfg(micro_world, tmp_path, "train.final_eval_workers=0"))


def test_craft_without_any_reward_term_is_refused(micro_world, tmp_path):
    cfg = micro_cfg(micro_world, tmp_path, "reward.draft_weight=0", "reward.preference_weight=0")
    with pytest.raises(UserError, match="nothing would reward"):
        training.check_craft_objective(cfg.reward)


# ----------------------------------------------------------------------------------------------- the driver


@pytest.mark.slow
def test_train_all_on_ray_logs_runs_and_prints_the_table(micro_world, tmp_path, ray_local, capsys):
    import mlflow

    from craft_ray import train

    port = _free_port()
    args = [f"tiny_world={micro_world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'runs'}", f"ray.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.sft_steps=3", "train.craft_steps=2",
            "train.eval_every=2", "train.checkpoint_every=2", "name=t-all", f"judges.port={port}",
            "judges.app_name=train_test_judges", "judges.route_prefix=/train_test_judges",
            "knowledge.online_enrichment=true", "knowledge.n_enriched=2"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "effective batch 4 = 4 per worker x 1 accumulation x 1 worker(s)" in out
    assert "SFT vs CRAFT" in out and "oracle label accuracy" in out and "tail reduction" in out
    assert "(evaluation: " in out and "s after CRAFT)" in out  # the tiny profile's 2 tasks, each with both LoRAs
    assert "checklist judge (MLLM)" in out  # the embedded judges answered
    run_dir = tmp_path / "runs" / "t-all"
    assert (run_dir / "sft" / LORA_WEIGHT_NAME).is_file() and (run_dir / "craft" / LORA_WEIGHT_NAME).is_file()
    summary = json.loads((run_dir / "results.json").read_text())["summary"]
    assert set(summary) == {"sft", "craft"}
    for s in summary.values():
        assert 0 <= s["train_tail_rate"] <= 1 and 0 <= s["ood_cas"] <= 1 and 0 <= s["oracle_label"] <= 1

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("craft_ray")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == {"all", "sft", "craft"}
    parent = by_stage["all"].info.run_id
    for stage in ("sft", "craft"):
        run = by_stage[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["modality"] == "cxr"
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, (3 if stage == "sft" else 2) + 1))
        # the tiny profile's train.sft_eval_every=100: SFT evaluates at its last step only
        evals = client.get_metric_history(run.info.run_id, "eval/train_cas")
        assert [m.step for m in evals] == ([3] if stage == "sft" else [2])
        assert "eval/ood_tail_rate" in run.data.metrics and "grad_norm" in run.data.metrics
        assert len(run.data.tags[training.LORA_TOKEN_TAG]) == 32  # the driver's token: the LoRA is logged
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"lora", "samples"} <= arts
    parent_run = by_stage["all"]
    assert "final/craft/train_tail_rate" in parent_run.data.metrics
    assert {"config", "knowledge", "results", "samples"} <= {a.path for a in client.list_artifacts(parent)}
    local = client.download_artifacts(parent, "knowledge/online_enrichment.json", str(tmp_path))
    enriched = json.loads(Path(local).read_text())
    assert set(enriched) == {"no_finding", "cardiomegaly", "pleural_effusion", "nodule"}
    assert all(len(p) == 2 and all(isinstance(x, str) and x for x in p) for p in enriched.values())
    assert parent_run.data.params["train.sft_steps"] == "3"

    # Rerunning with the same name resumes: nothing is trained again, the table is printed again.
    assert train.main(args) == 0
    assert "SFT vs CRAFT" in capsys.readouterr().out
    assert len(client.search_runs([exp.experiment_id])) == 3  # the same runs, continued
    history = client.get_metric_history(by_stage["sft"].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]  # no step trained twice
    from ray import serve

    serve.delete("train_test_judges")  # the embedded app stays up after a run; this test's should not


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_out_of_family_evaluator_of_the_same_family_is_refused(micro_world, tmp_path):
    from craft_ray import train

    args = [f"tiny_world={micro_world}", *MICRO_OVERRIDES, f"output_dir={tmp_path}",
            f"model.ood_evaluator.model=local-dir:{micro_world}/evaluator_vit", "model.ood_evaluator.family=vit"]
    with pytest.raises(UserError, match="out-of-family evaluator"):
        train.main(args)


def test_metrics_are_finite_numbers(micro_world, tmp_path):
    cfg = micro_cfg(micro_world, tmp_path, "train.sft_steps=2", "train.eval_every=2", "cas.use_judge=false")
    session = training.LocalSession(tmp_path / "ck")
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": "sft", "output_dir": str(tmp_path / "o")}
    training.run_stage(config, session)
    m = session.last_metrics
    for key in ("loss", "grad_norm", "lr", "images_per_s", "eval/train_cas", "eval/ood_cas", "eval/train_tail_rate",
                "eval/oracle_label"):
        assert np.isfinite(m[key]), key
    assert m["eval/judge_missing"] == 1.0  # no judge was asked


def test_reward_hacking_guard_rolls_back_to_the_best_out_of_family_checkpoint(tmp_path):
    """An exploitable reward: the training evaluator is an untrained, random open_clip model, so its CAS
    can be pushed up (large learning rate, no diffusion-loss anchor, no shifted copies) by images that the trained
    out-of-family evaluator of the shipped tiny world likes less and less; the guard must notice,
    warn and roll back to the evaluation that was best under the out-of-family CAS."""
    from safetensors.torch import load_file

    from craft_ray.models.diffusion import DiffusionModel
    from craft_ray.models.evaluators import make_tiny_evaluator

    random_vit = make_tiny_evaluator(tmp_path / "random_vit", "vit", seed=3, image_size=64, bpe_merges=2000)
    cfg = load_config(None, [
        f"model.evaluator.model=local-dir:{random_vit}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.n_train=48", "data.n_val=8", "data.n_test=48", "sampling.num_steps=4", "train.batch_size=4",
        "train.torch_threads=1", "train.eval_images_per_label=2", "train.log_every=1", "cas.use_judge=false",
        *DRAFT, "train.craft_steps=12", "train.craft_lr=0.05", "train.warmup_steps=0", "reward.beta=0",
        "reward.shifts=0",  # the plain reward: the tiny profile's shifted copies blunt this exploit
        "train.eval_every=1", "train.checkpoint_every=1", "train.hacking_patience=1",
        "train.hacking_action=rollback", "train.max_grad_norm=100", "model.gradient_checkpointing=false"])
    root = tmp_path / "run"
    base_lora = DiffusionModel.from_config(cfg.model).save_lora(tmp_path / "zero_lora")  # B = 0: the base model
    session = training.LocalSession(root / "ckpt-craft", keep=20)
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": "craft", "output_dir": str(root),
              "init_lora": str(base_lora)}
    with pytest.warns(UserWarning, match="reward hacking suspected"):
        state = training.run_stage(config, session)
    assert state.stopped_early and "rollback" in state.stopped_early
    assert state.step < 12
    steps, train_cas, ood = zip(*state.guard["history"], strict=True)
    ood_cas = [o["cas"] for o in ood]
    fell = state.guard["triggered_by"]  # a score the default train.hacking_watch names: cas or realism
    assert fell in ("cas", "realism")
    assert train_cas[-1] > train_cas[-2] and ood[-1][fell] < ood[-2][fell]  # what triggered it
    best = state.guard["best_step"]
    assert ood_cas[steps.index(best)] == max(ood_cas)
    final = load_file(str(root / "craft" / LORA_WEIGHT_NAME))
    best_lora = load_file(str(session.latest / training.BEST_LORA_FILE))
    assert final.keys() == best_lora.keys()
    for key in final:
        torch.testing.assert_close(final[key], best_lora[key])


@pytest.mark.slow
def test_judges_going_away_mid_run_degrade_evaluation_only(micro_world, tmp_path, ray_local):
    import threading
    import time

    from ray import serve

    from craft_ray import train

    app = "judges_go_away"
    # Its own route prefix: Serve refuses two applications on one prefix, and other tests' apps may run.
    cfg = micro_cfg(micro_world, tmp_path, "train.sft_steps=5", "train.sft_eval_every=1", f"judges.app_name={app}",
                    f"judges.route_prefix=/{app}",
                    f"judges.port={_free_port()}", "judges.client_retries=1", "judges.request_timeout_s=5")
    assert train.ensure_judges(cfg)
    root = tmp_path / "run"

    def remove_after_step_2() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            progress = training.read_progress(root, "sft")
            if progress and progress["step"] >= 2:
                serve.delete(app)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_after_step_2, daemon=True)
    killer.start()
    session = training.LocalSession(root / "ckpt", keep=2)
    config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "stage": "sft", "output_dir": str(root),
              "use_judges": True}
    state = training.run_stage(config, session)
    killer.join(timeout=5)
    assert state.step == 5  # training finished
    missing = [r["eval/judge_missing"] for r in session.reports]
    assert missing[0] == 0.0 and np.isfinite(session.reports[0]["eval/judge"])  # the judge answered at first
    assert missing[-1] == 1.0  # the judges were gone at the last evaluation
    assert not np.isfinite(session.reports[-1].get("eval/judge", float("nan")))
