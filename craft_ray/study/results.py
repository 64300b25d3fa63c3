"""Results of a reader study: counts from the stored votes, the statistics, and the Markdown/HTML/JSON summary.

Every vote (one reader, one pair) is one comparison. "Can't tell" answers are counted and reported
as ties but left out of win rates, sign tests and Bradley-Terry, which are about decisive votes.
Agreement between readers is computed on the pairs every reader (who answered at all) has answered.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray import report
from craft_ray.study import stats
from craft_ray.study.store import Store, Vote


def winner(vote: Vote) -> str | None:
    """The arm a vote prefers, or None for "can't tell"."""
    return {"left": vote.left_arm, "right": vote.right_arm}.get(vote.choice)


def _comparison(a: str, b: str, votes: Sequence[Vote]) -> dict[str, Any]:
    """Counts and statistics of arm a against arm b over the votes on pairs of exactly these two arms."""
    mine = [v for v in votes if {v.left_arm, v.right_arm} == {a, b}]
    wins_a = sum(winner(v) == a for v in mine)
    wins_b = sum(winner(v) == b for v in mine)
    decisive = wins_a + wins_b
    lo, hi = stats.wilson(wins_a, decisive)
    return {"a": a, "b": b, "votes": len(mine), "wins_a": wins_a, "wins_b": wins_b, "ties": len(mine) - decisive,
            "win_rate_a": wins_a / decisive if decisive else None, "ci_a": [lo, hi],
            "p_sign_test": stats.sign_test(wins_a, wins_b)}


def _agreement(votes: Sequence[Vote]) -> dict[str, Any]:
    """Cohen's (2 readers) or Fleiss' (more) kappa of the choices on the pairs every reader answered."""
    by_reader: dict[str, dict[str, str]] = defaultdict(dict)
    for v in votes:
        by_reader[v.reader][v.pair] = v.choice
    readers = sorted(by_reader)
    if len(readers) < 2:
        return {"readers": readers, "shared_pairs": 0, "method": None, "kappa": None}
    shared = sorted(set.intersection(*(set(d) for d in by_reader.values())))
    if not shared:
        return {"readers": readers, "shared_pairs": 0, "method": None, "kappa": None}
    if len(readers) == 2:
        kappa = stats.cohen_kappa([by_reader[readers[0]][p] for p in shared], [by_reader[readers[1]][p] for p in shared])
        method = "Cohen"
    else:
        cats = ["left", "right", "tie"]
        counts = np.array([[sum(by_reader[r][p] == c for r in readers) for c in cats] for p in shared])
        kappa, method = stats.fleiss_kappa(counts), "Fleiss"
    return {"readers": readers, "shared_pairs": len(shared), "method": method,
            "kappa": None if np.isnan(kappa) else float(kappa)}


def summarise(votes: Sequence[Vote], arms: Sequence[str], readers: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """All results of a study as plain data (what results.json holds)."""
    pairs = list(itertools.combinations(arms, 2))
    bt_ok = None
    arm_rows = []
    for arm in arms:
        mine = [v for v in votes if arm in (v.left_arm, v.right_arm)]
        wins = sum(winner(v) == arm for v in mine)
        losses = sum(winner(v) not in (arm, None) for v in mine)
        ratings = [r for v in mine for r, side in ((v.rating_left, v.left_arm), (v.rating_right, v.right_arm))
                   if side == arm and r is not None]
        lo, hi = stats.wilson(wins, wins + losses)
        arm_rows.append({"arm": arm, "votes": len(mine), "wins": wins, "losses": losses, "ties": len(mine) - wins - losses,
                         "win_rate": wins / (wins + losses) if wins + losses else None, "ci": [lo, hi],
                         "rating_mean": float(np.mean(ratings)) if ratings else None, "rating_n": len(ratings)})
    if len(arms) > 2:
        index = {a: i for i, a in enumerate(arms)}
        w = np.zeros((len(arms), len(arms)))
        for v in votes:
            if (win := winner(v)) is not None:
                loser = v.right_arm if win == v.left_arm else v.left_arm
                w[index[win], index[loser]] += 1
        for row, score in zip(arm_rows, stats.bradley_terry(w), strict=True):
            row["bradley_terry"] = float(score)
        bt_ok = stats.bradley_terry_identifiable(w)
    labels = sorted({v.label for v in votes})
    per_label = [{"label": label, **_comparison(a, b, [v for v in votes if v.label == label])}
                 for label in labels for a, b in pairs]
    return {"votes": len(votes), "arms": arm_rows, "comparisons": [_comparison(a, b, votes) for a, b in pairs],
            "per_label": [r for r in per_label if r["votes"]], "agreement": _agreement(votes),
            "readers": [dict(r) for r in readers], "bradley_terry_identifiable": bt_ok}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(ci: Sequence[float], rate: float | None) -> str:
    return "–" if rate is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def tables(res: Mapping[str, Any]) -> list[tuple[str, list[dict[str, str]]]]:
    """(heading, rows of strings) of every results table, shared by the Markdown and HTML summaries."""
    arms = [{"arm": r["arm"], "votes": str(r["votes"]), "wins": str(r["wins"]), "losses": str(r["losses"]),
             "can't tell": str(r["ties"]), "win rate %": _pct(r["win_rate"]), "95 % CI (Wilson)": _ci(r["ci"], r["win_rate"]),
             **({"Bradley-Terry": f"{r['bradley_terry']:.3f}"} if "bradley_terry" in r else {}),
             "plausibility (mean, n)": "–" if r["rating_mean"] is None else f"{r['rating_mean']:.2f} (n={r['rating_n']})"}
            for r in res["arms"]]

    def comp(r: Mapping[str, Any], label: bool = False) -> dict[str, str]:
        return {**({"label": r["label"]} if label else {}), "A": r["a"], "B": r["b"], "votes": str(r["votes"]),
                "A wins": str(r["wins_a"]), "B wins": str(r["wins_b"]), "can't tell": str(r["ties"]),
                "A win rate %": _pct(r["win_rate_a"]), "95 % CI": _ci(r["ci_a"], r["win_rate_a"]),
                "sign test p": _p(r["p_sign_test"])}

    ag = res["agreement"]
    agreement = [{"readers": str(len(ag["readers"])), "shared pairs": str(ag["shared_pairs"]),
                  "kappa": "–" if ag["kappa"] is None else f"{ag['kappa']:.3f}", "method": ag["method"] or "–"}]
    readers = [{"reader": r["name"], "answered": f"{r['answered']} / {r['total']}"} for r in res["readers"]]
    return [("Arms", arms), ("Head to head (two-sided exact sign test, can't tell excluded)",
                             [comp(r) for r in res["comparisons"]]),
            ("Per label", [comp(r, True) for r in res["per_label"]]),
            ("Inter-reader agreement (choices left / right / can't tell)", agreement), ("Readers", readers)]


def _notes(meta: Mapping[str, Any], res: Mapping[str, Any]) -> list[str]:
    bt = [] if res["bradley_terry_identifiable"] is not False else [
        "Bradley-Terry scores are at the boundary: some arm never won (or never lost) against the others, so "
        "its score is not a finite estimate; collect more votes before reading them."]
    return [f"Study {meta.get('name')!r}: {meta.get('modality')} images, {meta.get('n_pairs')} pairs, "
            f"{res['votes']} votes. Win rates count decisive votes only; each vote (reader x pair) is one comparison.", *bt]


def _document(meta: Mapping[str, Any], res: Mapping[str, Any]) -> tuple[str, list[str], list[tuple[str, str]]]:
    """(title, notes, (heading, pipe table) pairs) of the results page."""
    from craft_ray.evaluate import markdown_table

    return (f"Reader study: {meta.get('name')}", _notes(meta, res),
            [(heading, markdown_table(rows) or "(none)") for heading, rows in tables(res)])


def markdown(meta: Mapping[str, Any], res: Mapping[str, Any]) -> str:
    """The results as Markdown (what ``study results`` prints and writes to results.md)."""
    return report.markdown_document(*_document(meta, res))


def html_page(meta: Mapping[str, Any], res: Mapping[str, Any]) -> str:
    """The results as one self-contained HTML file."""
    return report.html_document(*_document(meta, res))


def write_results(folder: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Compute the results of the study in ``folder`` and write results.md, results.html and results.json there."""
    store = Store.open(folder)
    meta = store.meta()
    res = summarise(store.votes(), [a.name for a in store.arms()], store.readers())
    paths = {"md": folder / "results.md", "html": folder / "results.html", "json": folder / "results.json"}
    paths["md"].write_text(markdown(meta, res))
    paths["html"].write_text(html_page(meta, res))
    paths["json"].write_text(json.dumps({"study": meta, **res}, indent=2))
    return res, paths


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def log_mlflow(cfg: Any, meta: Mapping[str, Any], res: Mapping[str, Any], paths: Mapping[str, Path]) -> str:
    """Log the results as a new MLflow run tagged ``stage=study`` in ``cfg.tracking``; returns its id."""
    from mlflow.entities import Param

    from craft_ray import tracking

    c = tracking.client(cfg.tracking.tracking_uri)
    name = str(meta.get("name"))
    run_id = c.create_run(tracking.experiment_id(cfg), run_name=f"study-{name}", tags={
        "stage": "study", "craft_ray.study": name, "modality": str(meta.get("modality")),
        tracking.NAME_TAG: f"study-{name}"}).info.run_id
    c.log_batch(run_id, params=[Param(k, json.dumps(v)[:500]) for k, v in meta.items()])
    metrics = {"votes": res["votes"]}
    for r in res["arms"]:
        if r["win_rate"] is not None:
            metrics[f"win_rate.{_slug(r['arm'])}"] = r["win_rate"]
        if "bradley_terry" in r:
            metrics[f"bradley_terry.{_slug(r['arm'])}"] = r["bradley_terry"]
    for r in res["comparisons"]:
        metrics[f"p_sign_test.{_slug(r['a'])}_vs_{_slug(r['b'])}"] = r["p_sign_test"]
    if res["agreement"]["kappa"] is not None:
        metrics["kappa"] = res["agreement"]["kappa"]
    t = tracking.StageTracker(cfg.tracking.tracking_uri, run_id)
    t.log_metrics(metrics, step=0)
    for path in paths.values():
        t.log_artifact(path, "study")
    c.set_terminated(run_id, "FINISHED")
    return run_id
