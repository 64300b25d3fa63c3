"""The evaluation command: every metric on the micro world through Ray, memorization and FD sanity on
real phantom images, the compare table against hand-computed numbers, MLflow, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from craft_ray import cas, metrics
from craft_ray import evaluate as ev
from craft_ray.config import load_config
from craft_ray.data.dataset import load_dataset
from craft_ray.errors import UserError
from craft_ray.knowledge import load_shipped
from tests.conftest import MICRO_OVERRIDES, REPO_ROOT


def micro_cfg(world: Path, tmp: Path, *extra: str):
    return load_config(None, [f"tiny_world={world}", *MICRO_OVERRIDES, f"data.cache_dir={tmp / 'cache'}",
                              f"output_dir={tmp / 'runs'}", f"ray.storage_path={tmp / 'ray'}",
                              f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                              "evaluation.images_per_label=6", "evaluation.batch_size=8",
                              "evaluation.cpus_per_worker=0.5", "evaluation.classifier_epochs=3",
                              "evaluation.pr_k=3", *extra])


def cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "craft_ray.evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------- memorization and FD on real images


@pytest.fixture(scope="module")
def phantom_embeddings(tmp_path_factory):
    """Shipped tiny out-of-family evaluator embeddings of phantom cxr: train, held-out test, and an
    independent set (another phantom seed)."""
    from craft_ray.models.evaluators import load_evaluator

    tmp = tmp_path_factory.mktemp("phantom")
    torch.set_num_threads(2)
    out = {}
    for name, seed, split in (("train", 0, "train"), ("test", 0, "test"), ("independent", 7, "test")):
        cfg = load_config(None, [f"data.cache_dir={tmp}", f"data.phantom_seed={seed}", "data.n_train=96",
                                 "data.n_val=8", "data.n_test=96"])
        images, labels = ev.real_images(load_dataset(cfg), cfg, split)
        if "evaluator" not in out:
            out["evaluator"] = load_evaluator(cfg.model.ood_evaluator, "cpu")
        with torch.no_grad():
            out[name] = out["evaluator"].encode_images(images).numpy()
        out[f"{name}_pixels"] = ev.to_uint8(images)
    return out


def test_real_images_against_themselves_are_memorized_and_at_zero_fd(phantom_embeddings):
    e = phantom_embeddings
    thr = load_config(None, []).evaluation.memorization_threshold
    self_mem = metrics.memorization(e["test"], e["test"], thr)
    assert self_mem["share_above"] == 1.0 and self_mem["mean_nn_sim"] == pytest.approx(1.0, abs=1e-5)
    fd_self = metrics.frechet_distance(e["test"], e["test"])
    indep = metrics.memorization(e["independent"], e["test"], thr)
    assert indep["share_above"] < 0.2  # distinct phantoms of the same world are not copies
    # The tiny evaluator's unit-norm embeddings sit in a narrow cone, so FDs are small in absolute terms.
    fd_indep = metrics.frechet_distance(e["independent"], e["test"])
    assert fd_self < 1e-9 and fd_indep > 1e-4 and fd_self < 1e-4 * fd_indep


def test_a_set_copying_training_images_is_flagged(phantom_embeddings):
    """Generated images that are training images (re-encoded through uint8, like generated ones) are flagged;
    held-out real images of the same world mostly are not."""
    e = phantom_embeddings
    thr = load_config(None, []).evaluation.memorization_threshold
    copies = ev.from_uint8(e["train_pixels"][:40])
    with torch.no_grad():
        copy_emb = e["evaluator"].encode_images(copies).numpy()
    flagged = metrics.memorization(copy_emb, e["train"], thr)
    assert flagged["share_above"] == 1.0
    assert np.array_equal(flagged["nn_index"], np.arange(40))
    held_out = metrics.memorization(e["test"], e["train"], thr)
    assert held_out["share_above"] < 0.2


# ----------------------------------------------------------------------------------------- pure helpers


def test_merge_scores_and_checklist_audit():
    a = {"labels": ["x", "y"], "train_cas": np.array([0.1, 0.2]), "judge": np.array([0.5, 0.6]),
         "judge_items": {"x": {"ids": ["i1", "i2"], "p": np.array([[0.9, 0.1]])},
                         "y": {"ids": ["j1"], "p": np.array([[0.7]])}}}
    b = {"labels": ["x"], "train_cas": np.array([0.3]), "judge": np.array([0.4]),
         "judge_items": {"x": {"ids": ["i1", "i2"], "p": np.array([[0.2, 0.8]])}}}
    m = ev.merge_scores([a, b])
    assert m["labels"] == ["x", "y", "x"] and m["train_cas"].tolist() == [0.1, 0.2, 0.3]
    audit = ev.checklist_audit(m["judge_items"])
    assert audit == {"x": {"i1": 0.5, "i2": 0.5}, "y": {"j1": 1.0}}
    failed = ev.merge_scores([a, {**b, "judge_error": "ConnectionError: gone"}])
    assert failed["judge_error"].startswith("ConnectionError") and np.isnan(failed["judge"]).all()
    assert failed["judge_items"] == {}


def test_banks_and_thresholds_follow_the_evaluator_weights_not_its_path(micro_world, tmp_path):
    """Regenerating a world rewrites evaluator weights at the same path: the cached bank must not be reused."""
    import shutil

    from craft_ray.models.evaluators import make_tiny_evaluator

    world = tmp_path / "world"
    shutil.copytree(micro_world, world)
    cfg = micro_cfg(world, tmp_path)
    know = ev.load_knowledge_for(cfg)
    manifest = load_dataset(cfg)
    first = ev.ScoringSetup.build(cfg, "train", know, manifest=manifest)
    assert ev.ScoringSetup.build(cfg, "train", know, manifest=manifest).threshold.tau == first.threshold.tau
    shutil.rmtree(world / "evaluator_vit")
    make_tiny_evaluator(world / "evaluator_vit", "vit", seed=7, image_size=32, bpe_merges=2000)  # same path
    second = ev.ScoringSetup.build(cfg, "train", know, manifest=manifest)
    assert second.evaluator.id == first.evaluator.id
    assert second.scorer.bank.evaluator_id != first.scorer.bank.evaluator_id
    assert second.threshold.tau != first.threshold.tau
    lab = sorted(first.scorer.bank.embeddings)[0]
    assert not torch.allclose(second.scorer.bank.embeddings[lab], first.scorer.bank.embeddings[lab])
    assert len(list((tmp_path / "cache" / "cas").glob("*/*"))) == 2  # one cache folder per weights


def test_a_final_evaluation_split_by_label_is_the_whole_set(micro_world, tmp_path):
    """train.final_eval_workers splits a LoRA's final evaluation by label: the shards, merged, are the
    whole set's images and scores (the same seeds; exactly so when the generation batches align)."""
    cfg = micro_cfg(micro_world, tmp_path)
    labels = ["no_finding", "cardiomegaly", "pleural_effusion", "nodule"]
    whole, taus = ev.evaluate_lora(cfg, None, n_per_label=2)
    parts = [ev.evaluate_lora(cfg, None, n_per_label=2, labels=part)[0] for part in (labels[:2], labels[2:])]
    merged = ev.merge_scores(parts)
    assert merged["labels"] == whole["labels"] == [lab for lab in labels for _ in range(2)]
    assert whole["thumbs"].shape == merged["thumbs"].shape == (8, 32, 32, 3)  # every image when n_per_label < 8
    # 4 images per generation batch instead of 8 change float summation order only
    np.testing.assert_allclose(merged["train_cas"], whole["train_cas"], atol=1e-4)
    np.testing.assert_allclose(merged["ood_cas"], whole["ood_cas"], atol=1e-4)
    assert np.abs(merged["thumbs"].astype(int) - whole["thumbs"].astype(int)).max() <= 1
    assert set(taus) == {"train", "ood"}
    with pytest.raises(UserError, match="no such labels in the cxr evaluation set: effusion"):
        ev.evaluate_lora(cfg, None, n_per_label=2, labels=["effusion"])


def test_scores_round_trip(tmp_path):
    scores = {"labels": ["a", "b"], "train_cas": np.array([0.1, 0.9]), "embedding": np.ones((2, 4), np.float32),
              "judge_items": {}}
    ev.save_scores(tmp_path / "s.npz", scores, nn_sim=np.array([0.3, 0.4]))
    back = ev.load_scores(tmp_path / "s.npz")
    assert back["labels"] == ["a", "b"] and back["train_cas"].tolist() == [0.1, 0.9]
    assert "embedding" not in back and back["nn_sim"].tolist() == [0.3, 0.4]


# ------------------------------------------------------------------------------ the evaluation through Ray


@pytest.fixture(scope="module")
def evaluations(micro_world, ray_local, tmp_path_factory):
    """Three evaluations on the micro world: the base model, a LoRA on 1 and on 2 Ray workers."""
    from ray import serve

    from craft_ray.models.diffusion import DiffusionModel
    from tests.ray_nodes import free_ports

    tmp = tmp_path_factory.mktemp("evaluate")
    judges = [f"judges.port={free_ports(1)[0]}", "judges.app_name=eval_test_judges"]
    cfg = micro_cfg(micro_world, tmp, *judges)
    model = DiffusionModel.from_config(cfg.model, "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in model.lora_state_dict().items()}
    model.load_lora_state_dict(state)
    lora = model.save_lora(tmp / "my-lora")
    out = {"cfg": cfg, "tmp": tmp}
    cfg2 = micro_cfg(micro_world, tmp, *judges, "evaluation.num_workers=2", "evaluation.batch_size=5")
    try:
        out["base"] = ev.evaluate(cfg, ev.Subject("base", "base", None), tmp / "eval-base")  # starts the judges
        out["lora"] = ev.evaluate(cfg, ev.Subject("lora", "my-lora", lora), tmp / "eval-lora")
        out["lora2"] = ev.evaluate(cfg2, ev.Subject("lora", "my-lora", lora), tmp / "eval-lora-2")
        yield out
    finally:
        serve.shutdown()  # the embedded judges started here must not hold the Serve HTTP port for later tests


@pytest.mark.slow
def test_every_metric_computed_and_in_range(evaluations):
    s = evaluations["lora"]
    know = load_shipped("cxr", "phantom")
    labels = know.labels()
    assert s["images"] == 6 * len(labels)
    m = s["metrics"]
    for key in ("train_cas", "ood_cas", "train_label", "train_checklist", "train_modality", "train_realism",
                "train_tail_rate", "ood_tail_rate", "oracle_label", "judge"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["judge_missing"] == 0.0
    for name, block in s["image_set"].items():
        assert block["fd"] >= 0.0, name
        for key in ("precision", "recall", "coverage", "mean_nn_cosine", "memorized_share"):
            assert 0.0 <= block[key] <= 1.0 + 1e-9, (name, key)
        assert block["density"] >= 0.0
    assert set(s["downstream"]) == {"synthetic", "real", "real+synthetic"}
    for name, d in s["downstream"].items():
        assert 0.0 <= d["accuracy"] <= 1.0 and 0.0 <= d["macro_f1"] <= 1.0, name
        assert np.isnan(d["macro_auroc"]) or 0.0 <= d["macro_auroc"] <= 1.0
    assert s["downstream"]["synthetic"]["n_train"] == s["images"]
    assert s["downstream"]["real+synthetic"]["n_train"] == s["images"] + 48
    # checklist audit: one pass rate per item of every label's checklist
    assert set(s["audit"]) == set(labels)
    for lab, items in s["audit"].items():
        assert list(items) == [it.id for it in know.checklist(lab)]
        assert all(0.0 <= v <= 1.0 for v in items.values())


@pytest.mark.slow
def test_outputs_report_and_mlflow(evaluations):
    import mlflow

    folder = evaluations["tmp"] / "eval-lora"
    for name in ("report.md", "report.html", "scores.npz", "real_scores.npz", "summary.json", "config.yaml"):
        assert (folder / name).is_file(), name
    import csv

    from PIL import Image

    rows = list(csv.DictReader((folder / "images" / "images.csv").read_text().splitlines()))
    assert len(rows) == 24 and rows[0]["file"] == "00000.png" and int(rows[0]["seed"]) == 1_000_000
    assert Image.open(folder / "images" / rows[-1]["file"]).size == (32, 32)
    html = (folder / "report.html").read_text()
    for fig in ("fig-cas_hist_train", "fig-cas_hist_ood", "fig-per_label", "fig-samples_my-lora",
                "fig-memorization_my-lora", "fig-audit_my-lora"):
        assert f'id="{fig}"' in html, fig
    md = (folder / "report.md").read_text()
    assert "Downstream classification" in md and "Checklist audit" in md and "Fréchet distance" in md
    c = mlflow.tracking.MlflowClient(evaluations["cfg"].tracking.tracking_uri)
    runs = c.search_runs([c.get_experiment_by_name("craft_ray").experiment_id], "tags.stage = 'evaluate'")
    assert {r.data.tags["craft_ray.subject"] for r in runs} == {"base", "my-lora"}
    run = next(r for r in runs if r.data.tags["craft_ray.subject"] == "my-lora")
    assert run.data.metrics["eval/train_cas"] == pytest.approx(evaluations["lora"]["metrics"]["train_cas"], abs=1e-5)
    assert "eval/downstream/real/accuracy" in run.data.metrics
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/scores.npz", "evaluation/summary.json"} <= arts


@pytest.mark.slow
def test_workers_and_batch_size_do_not_change_the_images(evaluations):
    """The seed set fixes each image: 1 worker with batches of 8 and 2 workers with batches of 5 agree."""
    one = ev.load_scores(evaluations["tmp"] / "eval-lora" / ev.SCORES_FILE)
    two = ev.load_scores(evaluations["tmp"] / "eval-lora-2" / ev.SCORES_FILE)
    assert one["labels"] == two["labels"]
    # Batch size changes float summation order, which can flip a pixel's uint8 rounding: tiny differences.
    np.testing.assert_allclose(one["train_cas"], two["train_cas"], atol=1e-4)
    np.testing.assert_allclose(one["ood_cas"], two["ood_cas"], atol=1e-4)
    assert evaluations["lora2"]["num_workers"] == 2
    base = ev.load_scores(evaluations["tmp"] / "eval-base" / ev.SCORES_FILE)
    assert not np.allclose(base["train_cas"], one["train_cas"])  # the LoRA changed the images


@pytest.mark.slow
def test_compare_matches_hand_computed_metrics(evaluations):
    tmp, cfg = evaluations["tmp"], evaluations["cfg"]
    rows = ev.compare([str(tmp / "eval-base"), str(tmp / "eval-lora")], cfg, tmp / "cmp")
    base = ev.load_scores(tmp / "eval-base" / ev.SCORES_FILE)
    lora = ev.load_scores(tmp / "eval-lora" / ev.SCORES_FILE)
    tau = json.loads((tmp / "eval-base" / ev.SUMMARY_FILE).read_text())["taus"]["train"]
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["CAS mean (training evaluator)"]["my-lora"].startswith(f"{lora['train_cas'].mean():.3f} [")
    tail_row = next(r for k, r in by_metric.items() if k.startswith("tail rate") and "training" in k)
    assert tail_row["base"].startswith(f"{100 * np.mean(base['train_cas'] < tau):.1f} [")
    red = 100 * (np.mean(base["train_cas"] < tau) - np.mean(lora["train_cas"] < tau))
    assert by_metric["  tail reduction, points (training evaluator)"]["my-lora"].startswith(f"{red:.1f} [")
    assert cas.tail_rate(lora["train_cas"], tau) == pytest.approx(np.mean(lora["train_cas"] < tau))
    assert (tmp / "cmp" / "report.html").is_file()


@pytest.mark.slow
def test_compare_cli_with_mlflow_run_ids(evaluations):
    import mlflow

    tmp, cfg = evaluations["tmp"], evaluations["cfg"]
    c = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    runs = c.search_runs([c.get_experiment_by_name("craft_ray").experiment_id], "tags.stage = 'evaluate'",
                         order_by=["attributes.start_time ASC"])
    ids = [r.info.run_id for r in runs[:2]]
    out = cli("compare", *ids, "--tracking-uri", cfg.tracking.tracking_uri, "--out", str(tmp / "cmp-cli"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tail reduction, points" in out.stdout and (tmp / "cmp-cli" / "report.md").is_file()
    bad = cli("compare", str(tmp / "eval-base"), "no-such-run", "--tracking-uri", cfg.tracking.tracking_uri)
    assert bad.returncode == 2 and "neither an evaluation folder" in bad.stderr


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_help_and_bad_input(tmp_path):
    out = cli("--help")
    assert out.returncode == 0 and "--run" in out.stdout and "compare" in out.stdout
    none = cli(cwd=tmp_path)
    assert none.returncode == 2 and "one of the arguments --run --lora --base is required" in none.stderr
    both = cli("--base", "--lora", "x", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    missing = cli("--lora", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "LoRA" in missing.stderr and "not found" in missing.stderr
    no_run = cli("--run", "0123456789abcdef", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db", cwd=tmp_path)
    assert no_run.returncode == 2 and "no MLflow run '0123456789abcdef'" in no_run.stderr
    one = cli("compare", str(tmp_path), cwd=tmp_path)
    assert one.returncode == 2 and "at least two" in one.stderr
    cfg = cli("--base", "--print-config", "evaluation.images_per_label=3", cwd=tmp_path)
    assert cfg.returncode == 0 and "images_per_label: 3" in cfg.stdout


@pytest.mark.slow
def test_evaluate_an_mlflow_training_run(evaluations, micro_world):
    """--run RUN_ID: a stage=all parent resolves to its CRAFT child's LoRA and the parent's logged config."""
    import mlflow

    from craft_ray.config import to_yaml

    tmp = evaluations["tmp"]
    cfg = micro_cfg(micro_world, tmp, "name=trained", "cas.use_judge=false")
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    c = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    exp = c.get_experiment_by_name("craft_ray").experiment_id
    tags = {"craft_ray.name": "trained", "modality": "cxr"}
    parent = c.create_run(exp, run_name="trained", tags={**tags, "stage": "all"}).info.run_id
    child = c.create_run(exp, run_name="trained-craft",
                         tags={**tags, "stage": "craft", "mlflow.parentRunId": parent}).info.run_id
    c.log_artifact(parent, str(tmp / "config.yaml"), "config")
    c.log_artifact(child, str(tmp / "my-lora" / "pytorch_lora_weights.safetensors"), "lora")
    assert ev.main(["--run", parent, f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]) == 0
    summary = json.loads((tmp / "runs" / "evaluations" / "trained-craft" / ev.SUMMARY_FILE).read_text())
    assert summary["subject"]["run_id"] == child and summary["subject"]["kind"] == "run"
    assert summary["metrics"]["judge_missing"] == 1.0  # the run's config (cas.use_judge=false) was used
    # the LoRA is the one logged: same images as the --lora evaluation of that file
    lora = ev.load_scores(tmp / "eval-lora" / ev.SCORES_FILE)
    got = ev.load_scores(tmp / "runs" / "evaluations" / "trained-craft" / ev.SCORES_FILE)
    np.testing.assert_allclose(got["train_cas"], lora["train_cas"], atol=1e-4)
    runs = c.search_runs([exp], f"tags.`craft_ray.evaluated_run` = '{child}'")
    assert len(runs) == 1 and runs[0].data.tags["stage"] == "evaluate"
