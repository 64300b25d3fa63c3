"""The reader study: statistics against hand-computed values, study creation, the store, the API's bad inputs."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from craft_ray.errors import UserError
from craft_ray.study import stats
from craft_ray.study.create import REAL_ARM, Candidate, candidates, create_study, draw
from craft_ray.study.results import markdown, summarise, write_results
from craft_ray.study.store import Store, Vote

REPO = Path(__file__).resolve().parents[1]
LABELS = ("no_finding", "cardiomegaly", "pleural_effusion", "nodule")  # the cxr phantom labels


def fabricate_evaluation(folder: Path, name: str, *, labels=LABELS, seeds=range(3), modality: str = "cxr",
                         size: int = 16, seed: int = 0) -> Path:
    """An evaluation folder as craft_ray.evaluate writes it: summary.json, scores.npz, images/ + images.csv.

    Every PNG carries the generator's name in a text chunk, so tests can check none reaches a reader.
    """
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (label, s) in enumerate(itertools.product(labels, seeds)):
        info = PngInfo()
        info.add_text("generator", name)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i:05d}.png", pnginfo=info)
        rows.append([i, f"{i:05d}.png", label, f"a chest x-ray with {label}", s])
    with open(folder / "images" / "images.csv", "w", newline="") as f:
        csv.writer(f).writerows([["index", "file", "label", "prompt", "seed"], *rows])
    summary = {"subject": {"name": name, "kind": "lora"}, "modality": modality, "dataset": "phantom", "images": len(rows)}
    (folder / "summary.json").write_text(json.dumps(summary))
    np.savez(folder / "scores.npz", labels=np.array([r[2] for r in rows]))
    return folder


@pytest.fixture
def arms(tmp_path: Path) -> tuple[Path, Path]:
    a = fabricate_evaluation(tmp_path / "eval-a", "demo-sft", seed=1)
    b = fabricate_evaluation(tmp_path / "eval-b", "demo-craft", seeds=range(4), seed=2)  # seed 3 is unmatched
    return a, b


@pytest.fixture
def study(tmp_path: Path, arms: tuple[Path, Path]) -> Path:
    folder = tmp_path / "studies" / "s1"
    create_study(folder, "s1", [str(arms[0]), str(arms[1])], seed=0)
    return folder


# ------------------------------------------------------------------------------------------ statistics


def test_wilson_and_sign_test_against_hand_values() -> None:
    lo, hi = stats.wilson(7, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.397, 0.892)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    lo, hi = stats.wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / (10 + stats.Z95**2))
    # 2 * (C(10,9) + C(10,10)) / 2^10 = 22 / 1024
    assert stats.sign_test(9, 1) == pytest.approx(22 / 1024) and round(stats.sign_test(9, 1), 4) == 0.0215
    assert stats.sign_test(1, 9) == stats.sign_test(9, 1)
    assert stats.sign_test(5, 5) == 1.0 and stats.sign_test(0, 0) == 1.0


def test_cohen_kappa_against_hand_values() -> None:
    # Yes/yes 20, yes/no 5, no/yes 10, no/no 15: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4.
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)
    # Three categories, 10 items: agree on 7 (4 left, 2 right, 1 tie), so po = 0.7;
    # marginals A = (5, 3, 2)/10, B = (5, 4, 1)/10: pe = (25 + 12 + 2)/100 = 0.39; kappa = 0.31/0.61.
    ra = ["left"] * 4 + ["right"] * 2 + ["tie"] + ["left", "right", "tie"]
    rb = ["left"] * 4 + ["right"] * 2 + ["tie"] + ["right", "left", "right"]
    assert stats.cohen_kappa(ra, rb) == pytest.approx(0.31 / 0.61)
    assert stats.cohen_kappa(ra, ra) == pytest.approx(1.0)
    assert np.isnan(stats.cohen_kappa(["left"] * 3, ["left"] * 3))  # chance agreement is 1


def test_fleiss_kappa_wikipedia_example() -> None:
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert round(stats.fleiss_kappa(np.array(table)), 3) == 0.210
    with pytest.raises(ValueError, match="same number"):
        stats.fleiss_kappa(np.array([[2, 0], [1, 2]]))


def test_bradley_terry_toy() -> None:
    # Counts exactly proportional to strengths 4:2:1 (A-B 4:2, A-C 4:1, B-C 2:1) make them the MLE.
    wins = np.array([[0, 4, 4], [2, 0, 2], [1, 1, 0]])
    assert stats.bradley_terry(wins) == pytest.approx(np.array([4, 2, 1]) / 7, abs=1e-8)
    # Two arms: the strength share is the win share.
    assert stats.bradley_terry(np.array([[0, 7], [3, 0]])) == pytest.approx([0.7, 0.3], abs=1e-8)
    assert stats.bradley_terry(np.array([[0, 3], [0, 0]])) == pytest.approx([1.0, 0.0])
    assert stats.bradley_terry_identifiable(wins)
    assert not stats.bradley_terry_identifiable(np.array([[0, 2, 4], [0, 0, 1], [0, 0, 0]]))  # A never lost
    assert stats.bradley_terry_identifiable(np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]))  # a cycle suffices


def _vote(reader: str, pair: str, left: str, right: str, choice: str, label: str = "x",
          rl: int | None = None, rr: int | None = None) -> Vote:
    return Vote(reader, pair, label, left, right, choice, rl, rr, "")


def test_summarise_counts_and_statistics() -> None:
    # 10 votes of A vs B: A wins 7 (left or right side), B wins 2, one can't tell.
    votes = [_vote("r1", f"p{i}", "A", "B", "left", label="x" if i < 5 else "y", rl=4) for i in range(4)]
    votes += [_vote("r1", f"p{i}", "B", "A", "right", label="x" if i < 5 else "y", rr=2) for i in range(4, 7)]
    votes += [_vote("r1", "p7", "A", "B", "right", "y"), _vote("r1", "p8", "B", "A", "left", "y"),
              _vote("r1", "p9", "A", "B", "tie", "y")]
    res = summarise(votes, ["A", "B"])
    (comp,) = res["comparisons"]
    assert (comp["wins_a"], comp["wins_b"], comp["ties"], comp["votes"]) == (7, 2, 1, 10)
    assert comp["win_rate_a"] == pytest.approx(7 / 9)
    assert comp["ci_a"] == pytest.approx(list(stats.wilson(7, 9)))
    assert comp["p_sign_test"] == pytest.approx(2 * (1 + 9 + 36) / 512)  # P(X <= 2), X ~ Bin(9, .5), doubled
    a, b = res["arms"]
    assert (a["wins"], a["losses"], a["ties"], b["wins"]) == (7, 2, 1, 2)
    assert (a["rating_mean"], a["rating_n"]) == (pytest.approx((4 * 4 + 3 * 2) / 7), 7)
    assert b["rating_n"] == 0 and b["rating_mean"] is None
    assert "bradley_terry" not in a
    per = {r["label"]: r for r in res["per_label"]}
    assert (per["x"]["wins_a"], per["x"]["wins_b"], per["x"]["ties"]) == (5, 0, 0)
    assert (per["y"]["wins_a"], per["y"]["wins_b"], per["y"]["ties"]) == (2, 2, 1)
    assert res["agreement"]["kappa"] is None  # one reader


def test_summarise_three_arms_and_agreement() -> None:
    # Two readers on the same 4 pairs; reader r2 disagrees on one: po = 3/4.
    pairs = [("p1", "A", "B"), ("p2", "A", "C"), ("p3", "B", "C"), ("p4", "C", "A")]
    r1 = ["left", "left", "left", "right"]
    r2 = ["left", "left", "tie", "right"]
    votes = [_vote(r, p, lft, rgt, ch) for r, choices in (("r1", r1), ("r2", r2))
             for (p, lft, rgt), ch in zip(pairs, choices, strict=True)]
    res = summarise(votes, ["A", "B", "C"])
    wins = np.array([[0, 2, 4], [0, 0, 1], [0, 0, 0]])  # A beat B twice and C four times, B beat C once
    assert [r["bradley_terry"] for r in res["arms"]] == pytest.approx(stats.bradley_terry(wins).tolist())
    assert res["bradley_terry_identifiable"] is False and "at the boundary" in markdown({"name": "t"}, res)
    # r1 marginals left 3/4, right 1/4; r2 left 2/4, right 1/4, tie 1/4: pe = 6/16 + 1/16 = 7/16.
    ag = res["agreement"]
    assert (ag["method"], ag["shared_pairs"]) == ("Cohen", 4)
    assert ag["kappa"] == pytest.approx((0.75 - 7 / 16) / (1 - 7 / 16))
    res3 = summarise([*votes, *(_vote("r3", p, lft, rgt, "left") for p, lft, rgt in pairs[:2])], ["A", "B", "C"])
    assert (res3["agreement"]["method"], res3["agreement"]["shared_pairs"]) == ("Fleiss", 2)
    assert res3["agreement"]["kappa"] is None  # all three readers chose left on both shared pairs: pe = 1


# ------------------------------------------------------------------------------------------ creating studies


def test_draw_pairs_n_and_per_label() -> None:
    units = [(lab, s) for lab in ("a", "b", "c") for s in range(10)]
    pool = candidates(units, 3)
    assert len(pool) == 90 and pool[0] == Candidate("a", 0, (0, 1))
    rng = np.random.default_rng(0)
    assert len(draw(pool, None, False, rng)) == 90
    picked = draw(pool, 20, False, rng)
    assert len(picked) == len(set(picked)) == 20
    per = Counter(c.label for c in draw(pool, 20, True, rng))
    assert per == {"a": 7, "b": 7, "c": 6}
    with pytest.raises(UserError, match="only 90 matched pairs"):
        draw(pool, 91, False, rng)
    with pytest.raises(UserError, match="needs 31 pairs of label 'a'"):
        draw(pool, 93, True, rng)


def _study_pairs(folder: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(folder / "study.db")
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT p.label, li.label AS ll, ri.label AS rl, li.seed AS ls, ri.seed AS rs, "
                        "la.name AS la, ra.name AS ra FROM pairs p JOIN images li ON li.id = p.left_image "
                        "JOIN images ri ON ri.id = p.right_image JOIN arms la ON la.id = li.arm_id "
                        "JOIN arms ra ON ra.id = ri.arm_id").fetchall()
    conn.close()
    return rows


def test_create_matches_pairs_and_randomises_sides(tmp_path: Path) -> None:
    a = fabricate_evaluation(tmp_path / "a", "demo-sft", seeds=range(50), size=8, seed=1)
    b = fabricate_evaluation(tmp_path / "b", "demo-craft", seeds=range(5, 55), size=8, seed=2)
    meta = create_study(tmp_path / "s", "s", [str(a), str(b)], seed=0)
    rows = _study_pairs(tmp_path / "s")
    assert meta["matched_units"] == 4 * 45 and len(rows) == 180  # seeds 5..49 of every label
    assert all(r["ll"] == r["rl"] == r["label"] and r["ls"] == r["rs"] and 5 <= r["ls"] < 50 for r in rows)
    assert all({r["la"], r["ra"]} == {"demo-sft", "demo-craft"} for r in rows)
    left_a = sum(r["la"] == "demo-sft" for r in rows) / len(rows)
    assert 0.4 < left_a < 0.6
    # Same seed, same study; another seed draws other sides.
    meta2 = create_study(tmp_path / "s2", "s2", [str(a), str(b)], seed=0)
    assert meta2["n_pairs"] == 180
    assert [r["la"] for r in _study_pairs(tmp_path / "s2")] == [r["la"] for r in rows]
    create_study(tmp_path / "s3", "s3", [str(a), str(b)], seed=1)
    assert [r["la"] for r in _study_pairs(tmp_path / "s3")] != [r["la"] for r in rows]


def test_create_n_pairs_per_label_and_self_contained(tmp_path: Path, arms: tuple[Path, Path]) -> None:
    import shutil

    meta = create_study(tmp_path / "s", "s", [str(arms[0]), str(arms[1])], n_pairs=6, per_label=True, seed=3)
    rows = _study_pairs(tmp_path / "s")
    assert meta["n_pairs"] == 6 and Counter(r["label"] for r in rows) == {
        "cardiomegaly": 2, "no_finding": 2, "nodule": 1, "pleural_effusion": 1}
    files = sorted((tmp_path / "s" / "images").iterdir())
    assert len(files) == 12
    for f in files:
        data = f.read_bytes()
        assert b"demo-" not in data and b"tEXt" not in data  # re-encoded: no arm name in the file
        assert "demo" not in f.name and Image.open(f).size == (16, 16)
    for folder in arms:
        shutil.rmtree(folder)
    store = Store.open(tmp_path / "s")
    assert all(store.image_file(f.stem) == f for f in files)
    assert store.meta()["runs"] == [str(arms[0]), str(arms[1])]


def test_create_refuses_bad_inputs(tmp_path: Path, arms: tuple[Path, Path]) -> None:
    derm = fabricate_evaluation(tmp_path / "derm", "derm-gen", modality="derm")
    with pytest.raises(UserError, match=r"eval-a is a cxr evaluation but .*derm is derm"):
        create_study(tmp_path / "x", "x", [str(arms[0]), str(derm)])
    (arms[1] / "images" / "images.csv").unlink()
    with pytest.raises(UserError, match="evaluation.save_images=true"):
        create_study(tmp_path / "x", "x", [str(arms[0]), str(arms[1])])
    with pytest.raises(UserError, match="neither an evaluation folder"):
        create_study(tmp_path / "x", "x", [str(arms[0]), str(tmp_path / "nowhere")],
                     tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    other = fabricate_evaluation(tmp_path / "other", "o", seeds=range(10, 12))
    with pytest.raises(UserError, match="no \\(label, seed\\) is shared"):
        create_study(tmp_path / "x", "x", [str(arms[0]), str(other)])
    with pytest.raises(UserError, match="at least two generators"):
        create_study(tmp_path / "x", "x", [str(arms[0])])
    b2 = fabricate_evaluation(tmp_path / "b2", "b2")
    create_study(tmp_path / "y", "y", [str(arms[0]), str(b2)])
    with pytest.raises(UserError, match="already exists"):
        create_study(tmp_path / "y", "y", [str(arms[0]), str(b2)])


def test_create_with_real_arm(tmp_path: Path) -> None:
    a = fabricate_evaluation(tmp_path / "a", "gen-a", seeds=range(2), size=24, seed=1)
    b = fabricate_evaluation(tmp_path / "b", "gen-b", seeds=range(2), size=24, seed=2)
    overrides = ["data.n_train=16", "data.n_val=4", "data.n_test=16", "data.size=32", f"data.cache_dir={tmp_path}/cache"]
    meta = create_study(tmp_path / "s", "s", [str(a), str(b)], real=True, overrides=overrides, seed=0)
    assert meta["arms"] == ["gen-a", "gen-b", REAL_ARM] and meta["n_pairs"] == 8 * 3
    rows = _study_pairs(tmp_path / "s")
    assert Counter(frozenset((r["la"], r["ra"])) for r in rows) == {
        frozenset(("gen-a", "gen-b")): 8, frozenset(("gen-a", REAL_ARM)): 8, frozenset(("gen-b", REAL_ARM)): 8}
    assert all(r["ll"] == r["rl"] == r["label"] for r in rows)
    # Real images are resized to the generated size, so size does not give the arm away.
    assert {Image.open(f).size for f in (tmp_path / "s" / "images").iterdir()} == {(24, 24)}
    assert len(list((tmp_path / "s" / "images").iterdir())) == 8 * 3


# ------------------------------------------------------------------------------------------ store and tokens


def test_tokens_are_hashed_and_orders_differ(study: Path) -> None:
    store = Store.open(study)
    t1, t2 = store.add_reader("alice"), store.add_reader("bob")
    assert t1 != t2 and len(t1) >= 20
    assert store.reader(t1).name == "alice" and store.reader("nope") is None
    conn = sqlite3.connect(study / "study.db")
    assert conn.execute("SELECT COUNT(*) FROM readers WHERE token_hash IN (?, ?)", (t1, t2)).fetchone()[0] == 0
    conn.close()
    orders = [[store.item(r.id, pos)["pair"] for pos in range(1, 13)] for r in (store.reader(t1), store.reader(t2))]
    all_pairs = sorted(p.token for p, _, _ in store.pairs())
    assert sorted(orders[0]) == sorted(orders[1]) == all_pairs and orders[0] != orders[1]
    with pytest.raises(UserError, match="'alice' already has a token"):
        store.add_reader("alice")
    assert [(r["name"], r["answered"], r["total"]) for r in store.readers()] == [("alice", 0, 12), ("bob", 0, 12)]


# ------------------------------------------------------------------------------------------ the web API


def _client(study: Path, token: str | None = None):
    from fastapi.testclient import TestClient

    from craft_ray.study.app import create_app

    client = TestClient(create_app(study))
    if token is not None:
        assert client.post("/api/signin", json={"token": token}).status_code == 200
    return client


def test_sign_in_and_401(study: Path) -> None:
    token = Store.open(study).add_reader("alice")
    c = _client(study)
    for path in ("/api/next", "/api/item/1", "/img/abc.png"):
        assert c.get(path).status_code == 401, path
    assert c.post("/api/answers", json={"pair": "x", "choice": "left"}).status_code == 401
    assert c.post("/api/signin", json={"token": "wrong"}).status_code == 401
    bad = c.get("/?token=wrong", follow_redirects=False)
    assert bad.status_code == 401 and "Unknown token" in bad.text
    c.cookies.set("craft_study_token", "forged")
    assert c.get("/api/next").status_code == 401
    c.cookies.clear()
    page = c.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<body>")[1]
    r = c.get(f"/?token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    nxt = c.get("/api/next")
    assert nxt.status_code == 200 and nxt.json()["item"]["position"] == 1
    assert nxt.headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in nxt.headers[
        "content-security-policy"]
    c.post("/api/signout")
    assert c.get("/api/next").status_code == 401


def test_answers_resume_change_and_409(study: Path) -> None:
    c = _client(study, Store.open(study).add_reader("alice"))
    first = c.get("/api/next").json()
    assert (first["done"], first["total"], first["item"]["answer"]) == (0, 12, None)
    pair = first["item"]["pair"]
    r = c.post("/api/answers", json={"pair": pair, "choice": "left", "rating_left": 5, "rating_right": 2,
                                     "reason": " sharper heart border "})
    assert r.status_code == 201 and r.json() == {"stored": True, "done": 1, "total": 12}
    assert c.post("/api/answers", json={"pair": pair, "choice": "right"}).status_code == 409
    nxt = c.get("/api/next").json()["item"]
    assert nxt["position"] == 2 and nxt["pair"] != pair
    # Answering out of order (position 4) leaves the resume point at 2.
    p4 = c.get("/api/item/4").json()["item"]["pair"]
    assert c.post("/api/answers", json={"pair": p4, "choice": "tie"}).status_code == 201
    assert c.get("/api/next").json()["item"]["position"] == 2
    back = c.get("/api/item/1").json()["item"]
    assert back["answer"] == {"choice": "left", "rating_left": 5, "rating_right": 2, "reason": "sharper heart border"}
    assert c.post("/api/answers", json={"pair": pair, "choice": "right", "change": True}).status_code == 201
    assert c.get("/api/item/1").json()["item"]["answer"]["choice"] == "right"
    assert c.get("/api/next").json()["done"] == 2
    conn = sqlite3.connect(study / "study.db")
    assert conn.execute("SELECT changes FROM answers WHERE choice = 'right'").fetchone()[0] == 1
    conn.close()
    for pos in (0, 13, -1):
        assert c.get(f"/api/item/{pos}").status_code == 404
    assert c.get("/api/item/two").status_code == 422


@pytest.mark.parametrize("body", [
    {"choice": "up"}, {"choice": "LEFT"}, {"choice": None}, {"rating_left": 0}, {"rating_right": 6},
    {"rating_left": "x"}, {"rating_left": 2.5}, {"reason": "x" * 2001}, {"change": "maybe"}, {"arm": "demo-sft"},
])
def test_bad_answers_are_422(study: Path, body: dict) -> None:
    c = _client(study, Store.open(study).add_reader("alice"))
    pair = c.get("/api/next").json()["item"]["pair"]
    r = c.post("/api/answers", json={"pair": pair, "choice": "left", **body})
    assert r.status_code == 422, r.text
    assert c.post("/api/answers", json={"choice": "left"}).status_code == 422  # no pair
    assert c.post("/api/answers", content="pair=x&choice=left",
                  headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 422
    assert c.get("/api/next").json()["done"] == 0


def test_pair_of_another_study_is_404(tmp_path: Path, arms: tuple[Path, Path], study: Path) -> None:
    other = tmp_path / "studies" / "s2"
    create_study(other, "s2", [str(arms[0]), str(arms[1])], seed=5)
    foreign = _client(other, Store.open(other).add_reader("carol")).get("/api/next").json()["item"]
    c = _client(study, Store.open(study).add_reader("alice"))
    for pair in (foreign["pair"], "no-such-pair"):
        r = c.post("/api/answers", json={"pair": pair, "choice": "left"})
        assert r.status_code == 404 and "not one of your pairs" in r.json()["detail"]
    assert c.get(foreign["left"]).status_code == 404  # nor its images
    assert c.get("/img/..%2Fstudy.db").status_code == 404
    own = c.get("/api/next").json()["item"]
    img = c.get(own["left"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content[:4] == b"\x89PNG"


def test_readers_never_see_arms_or_each_others_answers(study: Path) -> None:
    store = Store.open(study)
    alice, bob = _client(study, store.add_reader("alice")), _client(study, store.add_reader("bob"))
    alice_pairs = set()
    for _ in range(5):
        it = alice.get("/api/next").json()["item"]
        alice_pairs.add(it["pair"])
        assert alice.post("/api/answers", json={"pair": it["pair"], "choice": "left", "reason": "alice-secret"}
                          ).status_code == 201
    secrets = ["demo-sft", "demo-craft", "eval-a", "eval-b", "alice-secret", "generator"]
    seen = [bob.get("/").text, bob.get("/api/next").text]
    for pos in range(1, 13):
        r = bob.get(f"/api/item/{pos}")
        seen.append(r.text)
        assert r.json()["item"]["answer"] is None  # bob has not answered anything
        seen += [bob.get(r.json()["item"][side]).content.decode("latin-1") for side in ("left", "right")]
    for text in seen:
        assert not any(s in text for s in secrets)
    assert bob.get("/api/next").json()["done"] == 0
    # No route exists beyond the documented ones (no admin, docs, or schema endpoints).
    paths = {getattr(r, "path", None) for r in bob.app.routes}
    assert paths == {"/", "/api/signin", "/api/signout", "/api/next", "/api/item/{position}", "/api/answers",
                     "/img/{name}"}
    for path in ("/docs", "/openapi.json", "/api/answers", "/api/results", "/api/arms"):
        assert bob.get(path).status_code in (404, 405)


def test_answers_are_durable(study: Path) -> None:
    store = Store.open(study)
    c = _client(study, store.add_reader("alice"))
    pair = c.get("/api/next").json()["item"]["pair"]
    assert c.post("/api/answers", json={"pair": pair, "choice": "tie", "rating_left": 3}).status_code == 201
    # A separate connection (another process would see the same) reads it without the app.
    conn = sqlite3.connect(study / "study.db")
    assert conn.execute("SELECT choice, rating_left FROM answers").fetchall() == [("tie", 3)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    fresh = _client(study)  # a new app instance, as after a server restart
    fresh.cookies.set("craft_study_token", c.cookies.get("craft_study_token"))
    again = fresh.get("/api/item/1").json()
    assert again["done"] == 1 and again["item"]["answer"]["choice"] == "tie"
    assert fresh.get("/api/next").json()["item"]["position"] == 2


# ------------------------------------------------------------------------------------------ results


def test_results_files_and_mlflow(study: Path, mlflow_store: str) -> None:
    from craft_ray.config import load_config
    from craft_ray.study.results import log_mlflow

    store = Store.open(study)
    cast = Counter()
    arm_of = {p.token: (la, ra) for p, la, ra in store.pairs()}
    for name, choices in (("alice", ["left", "right", "left", "tie", "left", "left"]), ("bob", ["right"] * 3)):
        c = _client(study, store.add_reader(name))
        for ch in choices:
            pair = c.get("/api/next").json()["item"]["pair"]
            c.post("/api/answers", json={"pair": pair, "choice": ch, "rating_left": 4})
            if ch != "tie":
                cast[arm_of[pair][0 if ch == "left" else 1]] += 1
    res, paths = write_results(study)
    by_arm = {r["arm"]: r for r in res["arms"]}
    assert {a: by_arm[a]["wins"] for a in by_arm} == {a: cast[a] for a in ("demo-sft", "demo-craft")}
    assert sum(r["ties"] for r in res["comparisons"]) == 1 and res["votes"] == 9
    assert json.loads(paths["json"].read_text())["arms"][0]["wins"] == by_arm["demo-sft"]["wins"]
    md = paths["md"].read_text()
    assert "## Head to head" in md and re.search(r"\| demo-sft +\| demo-craft +\| 9 +\|", md)
    assert "<table>" in paths["html"].read_text()
    cfg = load_config(None, [f"tracking.tracking_uri={mlflow_store}"])
    run_id = log_mlflow(cfg, store.meta(), res, paths)
    from craft_ray.tracking import client

    run = client(mlflow_store).get_run(run_id)
    assert run.data.tags["stage"] == "study" and run.data.tags["craft_ray.study"] == "s1"
    assert run.data.metrics["votes"] == 9
    assert run.data.metrics["win_rate.demo-sft"] == pytest.approx(by_arm["demo-sft"]["win_rate"])
    assert {a.path for a in client(mlflow_store).list_artifacts(run_id, "study")} == {
        "study/results.md", "study/results.html", "study/results.json"}


def test_cli_errors_are_one_line(tmp_path: Path, arms: tuple[Path, Path]) -> None:
    derm = fabricate_evaluation(tmp_path / "derm", "d", modality="derm")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cases = [
        (["create", "--runs", str(arms[0]), str(arms[1])], "create needs the study NAME before --runs"),
        (["create", "x", "--runs", str(arms[0]), str(derm)], "is a cxr evaluation but"),
        (["create", "../up", "--runs", str(arms[0]), str(arms[1])], "study name '../up'"),
        (["create", "x", "--runs", str(arms[0]), str(arms[1]), "data.n_test=3"], "looks like a key=value override"),
        (["create", "x", "--n-pairs", "2", "data.n_test=3", "--runs", str(arms[0]), str(arms[1])], "add --real"),
        (["create", "x", "--n-pairs", "0", "--runs", str(arms[0]), str(arms[1])], "must be at least 1"),
        (["serve", "missing"], "no study in"),
        (["token", "missing", "--reader", "a"], "no study in"),
        (["results", "missing"], "no study in"),
        (["bogus"], "invalid choice"),
    ]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "craft_ray.study", *args, "--dir", str(tmp_path / "studies")]
                             if args != ["bogus"] else [sys.executable, "-m", "craft_ray.study", *args],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], (args, out.stderr)
