"""CAS dimensions, weights, reference bank, threshold provenance, tail metrics and the reward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from craft_ray import cas
from craft_ray.config import EvaluatorConfig
from craft_ray.data.phantom import generate
from craft_ray.errors import UserError
from craft_ray.knowledge import load_shipped
from craft_ray.models.evaluators import load_evaluator, make_tiny_evaluator
from craft_ray.rewards import make_reward

EQUAL = {"label": 0.25, "checklist": 0.25, "modality": 0.25, "realism": 0.25}


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory: pytest.TempPathFactory):
    folder = make_tiny_evaluator(tmp_path_factory.mktemp("ev") / "vit", "vit", seed=0)
    return load_evaluator(EvaluatorConfig(model=f"local-dir:{folder}", family="vit"))


@pytest.fixture(scope="module")
def knowledge():
    return load_shipped("cxr", "phantom")


@pytest.fixture(scope="module")
def texts(evaluator, knowledge):
    return cas.build_texts(evaluator, knowledge, "cxr")


def images_and_labels(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    batch = generate("cxr", n, size=64, seed=seed)
    x = torch.from_numpy(np.ascontiguousarray(batch.images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, list(batch.labels)


@pytest.fixture(scope="module")
def bank(evaluator, knowledge):
    x, labels = images_and_labels(64, seed=1)
    with torch.no_grad():
        emb = evaluator.encode_images(x)
    return cas.build_reference_bank(emb, labels, k=3, evaluator_id=evaluator.id,
                                    knowledge_version=knowledge.content_hash())


def test_dimensions_are_batched_and_in_unit_interval(evaluator, texts, bank) -> None:
    x, labels = images_and_labels(12, seed=2)
    dims = cas.CASScorer(evaluator, texts, bank).dimensions(x, labels)
    assert set(dims) == set(cas.DIMENSIONS)
    for name, value in dims.items():
        assert value.shape == (12,), name
        assert torch.all((value >= 0) & (value <= 1)), name


class Blind:
    """An evaluator that cannot tell images apart (constant image embedding, zero logit scale)."""

    def __init__(self, inner):
        self.inner, self.logit_scale, self.id = inner, 0.0, "blind"

    def encode_texts(self, prompts):
        return self.inner.encode_texts(prompts)

    def encode_images(self, images):
        return F.normalize(torch.ones(images.shape[0], 64), dim=-1) + 0 * images.sum()


def test_blind_evaluator_gives_chance_values(evaluator, texts) -> None:
    x, labels = images_and_labels(8, seed=3)
    dims = cas.CASScorer(Blind(evaluator), texts, None).dimensions(x, labels)
    assert torch.allclose(dims["label"], torch.full((8,), 1 / 4))  # four phantom cxr labels
    assert torch.allclose(dims["checklist"], torch.full((8,), 0.5))
    assert torch.allclose(dims["modality"], torch.full((8,), 1 / 8))  # 4 modalities + 4 distractors


def test_weights_are_validated() -> None:
    assert cas.check_weights(EQUAL) == EQUAL
    with pytest.raises(UserError, match="must sum to 1"):
        cas.check_weights({"label": 0.5, "checklist": 0.6})
    with pytest.raises(UserError, match="unknown CAS dimension"):
        cas.check_weights({"label": 0.5, "beauty": 0.5})
    with pytest.raises(UserError, match=">= 0"):
        cas.check_weights({"label": 1.5, "checklist": -0.5})
    assert cas.normalise_weights({"label": 2, "checklist": 2}) == {
        "label": 0.5, "checklist": 0.5, "modality": 0.0, "realism": 0.0}
    with pytest.raises(UserError, match="cannot be normalised"):
        cas.normalise_weights({"label": 0})


def test_combine_is_the_weighted_sum() -> None:
    dims = {d: torch.tensor([0.1 * (i + 1), 0.2]) for i, d in enumerate(cas.DIMENSIONS)}
    out = cas.combine(dims, {"label": 0.5, "realism": 0.5, "checklist": 0, "modality": 0})
    assert torch.allclose(out, torch.tensor([0.5 * 0.1 + 0.5 * 0.4, 0.2]))


def test_tail_rate_of_real_images_matches_q(evaluator, texts, bank, knowledge) -> None:
    scorer = cas.CASScorer(evaluator, texts, bank)
    with torch.no_grad():
        ref, ref_labels = images_and_labels(300, seed=10)
        held, held_labels = images_and_labels(300, seed=11)
        cas_ref, _ = scorer.score(ref, ref_labels, EQUAL)
        cas_held, _ = scorer.score(held, held_labels, EQUAL)
    thr = cas.compute_threshold(cas_ref, 0.1, modality="cxr", evaluator_id=evaluator.id,
                                knowledge_version=knowledge.content_hash(), weights=EQUAL)
    rate = cas.tail_rate(cas_held, thr.tau)
    sigma = np.sqrt(0.1 * 0.9 / 300)
    assert abs(rate - 0.1) < 4 * sigma, rate  # sampling error of an independent real set
    assert cas.tail_rate(cas_ref, thr.tau) == pytest.approx(0.1, abs=1 / 300)


def test_threshold_mismatch_raises(tmp_path: Path) -> None:
    thr = cas.compute_threshold(np.linspace(0, 1, 101), 0.1, modality="cxr", evaluator_id="local-dir:a",
                                knowledge_version="k1", weights=EQUAL)
    assert thr.tau == pytest.approx(0.1)
    path = thr.save(tmp_path / "tau.json")
    assert cas.Threshold.load(path, evaluator_id="local-dir:a", knowledge_version="k1", q=0.1).tau == thr.tau
    with pytest.raises(UserError, match="evaluator_id='local-dir:a' but the current one is 'local-dir:b'"):
        cas.Threshold.load(path, evaluator_id="local-dir:b", knowledge_version="k1")
    with pytest.raises(UserError, match="knowledge_version='k1' but the current one is 'k2'"):
        cas.Threshold.load(path, evaluator_id="local-dir:a", knowledge_version="k2")
    with pytest.raises(UserError, match="q=0.2 was asked"):
        cas.Threshold.load(path, evaluator_id="local-dir:a", knowledge_version="k1", q=0.2)


def test_reference_bank_round_trip_and_mismatch(bank, tmp_path: Path) -> None:
    path = bank.save(tmp_path / "bank.safetensors")
    again = cas.ReferenceBank.load(path, evaluator_id=bank.evaluator_id, knowledge_version=bank.knowledge_version)
    assert again.median == bank.median and again.k == bank.k
    for lab, emb in bank.embeddings.items():
        assert torch.equal(again.embeddings[lab], emb)
    with pytest.raises(UserError, match="reference bank"):
        cas.ReferenceBank.load(path, evaluator_id="other", knowledge_version=bank.knowledge_version)


def test_realism_is_high_for_real_and_low_for_noise(evaluator, bank) -> None:
    x, labels = images_and_labels(32, seed=4)
    noise = torch.rand_like(x) * 2 - 1
    with torch.no_grad():
        real = bank.realism(evaluator.encode_images(x), labels)
        fake = bank.realism(evaluator.encode_images(noise), labels)
    assert real.mean() > fake.mean()


def test_tail_metrics_by_hand() -> None:
    assert cas.tail_rate(np.array([0.1, 0.2, 0.3, 0.4]), 0.25) == 0.5
    red = cas.tail_reduction(0.1, 0.4)
    assert red["absolute"] == pytest.approx(0.3) and red["relative"] == pytest.approx(0.75)
    est, lo, hi = cas.bootstrap_ci(np.arange(100.0), n_boot=500)
    assert est == pytest.approx(49.5) and lo < 49.5 < hi and hi - lo < 20
    rate, lo, hi = cas.tail_rate_ci(np.r_[np.zeros(20), np.ones(80)], 0.5, n_boot=500)
    assert rate == pytest.approx(0.2) and lo < 0.2 < hi
    ci = cas.tail_reduction_ci(np.r_[np.zeros(10), np.ones(90)], np.r_[np.zeros(40), np.ones(60)], 0.5,
                               n_boot=500)
    assert ci["absolute"][0] == pytest.approx(0.3) and ci["absolute"][1] < 0.3 < ci["absolute"][2]
    assert ci["relative"][0] == pytest.approx(0.75)


def test_checklist_judge_twin_and_gating() -> None:
    p = np.array([[0.9, 0.8, 0.6], [0.2, 0.9, 0.9]])
    ids = ["lesion", "border", "colour"]
    parents = {"lesion": None, "border": "lesion", "colour": "border"}
    assert np.allclose(cas.checklist_judge(p, ids, parents), [(0.9 + 0.8 + 0.6) / 3, (0.2 + 0.9 + 0.9) / 3])
    # second image: the root is answered no, so both descendants count 0
    assert np.allclose(cas.checklist_judge(p, ids, parents, gating=True), [(0.9 + 0.8 + 0.6) / 3, 0.2 / 3])
    with pytest.raises(UserError, match="p_yes must be"):
        cas.checklist_judge(p[:, :2], ids, parents)


def test_reward_gradient_matches_finite_differences(evaluator, texts, bank) -> None:
    ev64 = load_evaluator(EvaluatorConfig(model=evaluator.id, family="vit")).to(dtype=torch.float64)
    texts64 = cas.build_texts(ev64, load_shipped("cxr", "phantom"), "cxr")
    bank64 = cas.ReferenceBank({k: v.double() for k, v in bank.embeddings.items()}, bank.median, bank.spread,
                               bank.k, bank.evaluator_id, bank.knowledge_version)
    reward_fn = make_reward(EQUAL, cas.CASScorer(ev64, texts64, bank64))
    x, labels = images_and_labels(2, seed=5)
    x = x.double().requires_grad_(True)
    meta = [{"label": y} for y in labels]
    reward, info = reward_fn(x, ["p"] * 2, meta)
    assert set(info) == set(cas.DIMENSIONS) and not info["label"].requires_grad
    reward.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    eps = 1e-5
    for idx in [(0, 0, 20, 30), (1, 2, 40, 10), (0, 1, 32, 32)]:
        plus, minus = x.detach().clone(), x.detach().clone()
        plus[idx] += eps
        minus[idx] -= eps
        with torch.no_grad():
            fd = (reward_fn(plus, ["p"] * 2, meta)[0].sum() - reward_fn(minus, ["p"] * 2, meta)[0].sum()) / (2 * eps)
        assert float(x.grad[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)


def test_log_reward_is_the_weighted_log_of_the_dimensions_and_keeps_realism_gradient(evaluator, texts, bank
                                                                                    ) -> None:
    scorer = cas.CASScorer(evaluator, texts, bank)
    x, labels = images_and_labels(4, seed=8)
    meta = [{"label": y} for y in labels]
    linear, info = make_reward(EQUAL, scorer)(x, ["p"] * 4, meta)
    logged, _ = make_reward(EQUAL, scorer, form="log")(x, ["p"] * 4, meta)
    torch.testing.assert_close(linear, sum(0.25 * info[d] for d in cas.DIMENSIONS))
    torch.testing.assert_close(logged, sum(0.25 * torch.log(info[d] + 1e-4) for d in cas.DIMENSIONS))
    # A realism near 0 (sigmoid far in its tail): the log form's gradient is 1/dim times the CAS form's.
    d = torch.tensor([6.0], requires_grad=True)  # k-NN distance 6 spreads above the real median
    r = cas.realism_dim(d, torch.tensor([0.0]), torch.tensor([1.0]))
    (g_cas,) = torch.autograd.grad(r.sum(), d)
    (g_log,) = torch.autograd.grad(torch.log(cas.realism_dim(d, torch.tensor([0.0]), torch.tensor([1.0])) + 1e-4).sum(), d)
    assert float(g_log) / float(g_cas) > 100
    with pytest.raises(UserError, match="unknown reward.form 'exp'; known: cas, log"):
        make_reward(EQUAL, scorer, form="exp")


def test_shifted_reward_averages_the_dimensions_of_reflect_padded_shifted_copies(evaluator, texts, bank) -> None:
    from craft_ray.rewards import shifted

    scorer = cas.CASScorer(evaluator, texts, bank)
    x, labels = images_and_labels(3, seed=9)
    meta = [{"label": y} for y in labels]
    # one copy, drawn from a seeded generator: the dimensions of exactly that shifted image
    reward, info = make_reward(EQUAL, scorer, shifts=1)(x, ["p"] * 3, meta, generator=torch.Generator().manual_seed(4))
    moved = shifted(x, 0.0625, torch.Generator().manual_seed(4))
    assert not torch.equal(moved, x) and moved.shape == x.shape
    expected = scorer.dimensions(moved, labels)
    for d in cas.DIMENSIONS:
        torch.testing.assert_close(info[d], expected[d].detach())
    # a shift by (dy, dx) is the reflect-padded image cropped at (dy, dx): pixels move, none are invented
    py = round(0.0625 * x.shape[-2])
    g = torch.Generator().manual_seed(4)
    dy, dx = (int(torch.randint(0, 2 * py + 1, (1,), generator=g)) for _ in range(2))
    torch.testing.assert_close(moved, F.pad(x, (py, py, py, py), mode="reflect")[..., dy:dy + 64, dx:dx + 64])
    # several copies: the mean of their dimensions; the gradient reaches the pixels through every copy
    xg = x.clone().requires_grad_(True)
    reward, info = make_reward(EQUAL, scorer, shifts=3)(xg, ["p"] * 3, meta, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    copies = [scorer.dimensions(shifted(x, 0.0625, g), labels) for _ in range(3)]
    for d in cas.DIMENSIONS:
        # (with gradients on, the realism dimension differs by about 1e-4 in float32: agreement to 1e-3)
        torch.testing.assert_close(info[d], torch.stack([c[d] for c in copies]).mean(0).detach(), atol=1e-3, rtol=1e-3)
    reward.sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    # shifts=0 is the plain reward; bad settings are refused
    plain, _ = make_reward(EQUAL, scorer)(x, ["p"] * 3, meta)
    torch.testing.assert_close(make_reward(EQUAL, scorer, shifts=0)(x, ["p"] * 3, meta)[0], plain)
    with pytest.raises(UserError, match="reward.shifts must be >= 0"):
        make_reward(EQUAL, scorer, shifts=-1)
    with pytest.raises(UserError, match="max_shift in \\[0, 0.5\\)"):
        make_reward(EQUAL, scorer, shifts=1, max_shift=0.5)


def test_grad_sigma_keeps_the_reward_and_smooths_its_image_gradient(evaluator, texts, bank) -> None:
    import torchvision.transforms.functional as TF

    scorer = cas.CASScorer(evaluator, texts, bank)
    x, labels = images_and_labels(3, seed=11)
    meta = [{"label": y} for y in labels]
    grads = {}
    for sigma in (0.0, 2.0):
        xg = x.clone().requires_grad_(True)
        reward, _ = make_reward(EQUAL, scorer, grad_sigma=sigma)(xg, ["p"] * 3, meta)
        reward.sum().backward()
        grads[sigma] = (reward.detach(), xg.grad)
    # the same reward going forward ...
    torch.testing.assert_close(grads[2.0][0], grads[0.0][0])
    # ... and, going back, exactly the plain gradient blurred by a Gaussian of 2 px (13 taps, reflect-padded)
    torch.testing.assert_close(grads[2.0][1], TF.gaussian_blur(grads[0.0][1], [13, 13], [2.0, 2.0]))

    def roughness(g: torch.Tensor) -> float:  # energy of pixel-to-pixel differences over total energy
        return float(((g[..., 1:] - g[..., :-1]) ** 2).sum() / (g ** 2).sum())

    assert roughness(grads[2.0][1]) < 0.2 * roughness(grads[0.0][1])
    with pytest.raises(UserError, match="reward.grad_sigma must be >= 0"):
        make_reward(EQUAL, scorer, grad_sigma=-1.0)


def test_reward_refuses_realism_without_bank(evaluator, texts) -> None:
    with pytest.raises(UserError, match="reference bank"):
        make_reward(EQUAL, cas.CASScorer(evaluator, texts, None))


class ScriptedJudge:
    """A judge that answers from a table: it records the questions it was asked."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def p_yes(self, images, questions):
        self.asked += list(questions)
        return [self.answer(q) for q in questions]


def test_judge_checklist_asks_every_item(knowledge) -> None:
    items = knowledge.checklist("nodule")
    root = next(it for it in items if it.parent is None)
    judge = ScriptedJudge(lambda q: 0.1 if q == root.question else 0.9)
    score, p, ids = cas.judge_checklist(judge, [object(), object()], "nodule", knowledge)
    assert ids == [it.id for it in items] and p.shape == (2, len(items))
    assert len(judge.asked) == 2 * len(items)
    assert np.allclose(score, (0.1 + 0.9 * (len(items) - 1)) / len(items))
    gated, _, _ = cas.judge_checklist(judge, [object()], "nodule", knowledge, gating=True)
    assert gated[0] == pytest.approx(0.1 / len(items))  # every item hangs below the root in this file


def test_reference_bank_is_built_once_then_reused(evaluator, knowledge, tmp_path: Path) -> None:
    calls = []

    def real():
        calls.append(1)
        return images_and_labels(24, seed=6)

    path = tmp_path / "bank.safetensors"
    first = cas.reference_bank(path, evaluator, knowledge.content_hash(), real, k=3)
    second = cas.reference_bank(path, evaluator, knowledge.content_hash(), real, k=3)
    assert len(calls) == 1 and second.median == first.median
    with pytest.raises(UserError, match="knowledge_version"):
        cas.reference_bank(path, evaluator, "another-version", real, k=3)
