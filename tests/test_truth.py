"""Ground-truth answers of phantom checklist items: safe evaluator, schema rules, consistency with the generators."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from craft_ray.data.phantom import generate
from craft_ray.data.phantom.truth import (
    META_KEYS,
    TruthError,
    answers,
    evaluate,
    item_truth,
    names_for,
    parse,
)
from craft_ray.errors import UserError
from craft_ray.knowledge import ChecklistItem, load_knowledge, load_shipped, shipped_path
from craft_ray.modalities import MODALITY_NAMES

META = {"ctr": 0.6, "nodule_count": 2, "nodule_radii": [2.5, 3.0], "colours": ["blue_grey", "dark"], "side": ""}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("ctr > 0.5", True),
        ("0.55 <= ctr <= 0.7 and nodule_count == 2", True),
        ("ctr < 0.5 or nodule_count != 2", False),
        ("not ctr > 0.5", False),
        ('"blue_grey" in colours', True),
        ('"pink" not in colours and len(colours) >= 2', True),
        ("len(nodule_radii) == nodule_count", True),
        ("ctr * 2 - 0.2 / 2 + 1 > 2.0", True),
        ("-ctr < 0", True),
        ('side == "" and label == "nodule"', True),
        ('label != "nodule"', False),
    ],
)
def test_evaluate_allowed_language(expression: str, expected: bool) -> None:
    assert evaluate(expression, {**META, "label": "nodule"}) is expected


def test_and_or_short_circuit_like_python() -> None:
    # The right-hand side would divide by zero: `and` must not reach it.
    assert evaluate("nodule_count > 0 and ctr / nodule_count > 1", {"nodule_count": 0, "ctr": 1.0}) is False
    assert evaluate("nodule_count == 0 or ctr / nodule_count > 1", {"nodule_count": 0, "ctr": 1.0}) is True


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("ctr.real > 0", "Attribute 'ctr.real' is not allowed"),
        ("colours.__class__", "Attribute"),
        ("__import__('os').system('true')", "call \"__import__('os').system('true')\" is not allowed"),
        ("__import__('os')", "only function is len(x)"),
        ("open('x')", "only function is len(x)"),
        ("len(colours, 2) > 0", "len takes exactly one argument"),
        ("import os", "invalid expression 'import os'"),
        ("lambda: 1", "Lambda 'lambda: 1' is not allowed"),
        ("colours[0] == 'dark'", "Subscript"),
        ("nodule_radii['__class__']", "Subscript"),
        ("[x for x in colours]", "ListComp"),
        ("ctr ** 2 > 0", "BinOp 'ctr ** 2' is not allowed"),
        ("ctr is None", "Compare 'ctr is None' is not allowed"),
        ("ctr if ctr else 1", "IfExp"),
        ("(ctr := 1)", "NamedExpr"),
        ("ctr > 0.5; 1", "invalid expression"),
        ("", "must be a non-empty expression string"),
        ("b'x' in colours", "constant b'x' is not allowed"),
        ("f'{ctr}' == ''", "JoinedStr"),
    ],
)
def test_parse_rejects_unsafe_expressions(expression: str, problem: str) -> None:
    with pytest.raises(TruthError) as info:
        parse(expression)
    assert problem in str(info.value)
    assert isinstance(info.value, UserError)


def test_unknown_names() -> None:
    with pytest.raises(TruthError, match=r"unknown name 'heart_ratio'; known: .*ctr.*label"):
        parse("heart_ratio > 0.5", names_for("cxr"))
    with pytest.raises(TruthError, match=r"unknown metadata key 'heart_ratio'; known: colours, ctr"):
        evaluate("heart_ratio > 0.5", {"ctr": 0.4, "colours": []})
    with pytest.raises(TruthError, match=r"cannot evaluate 'colours > 1' on this metadata"):
        evaluate("colours > 1", {"colours": []})


def test_item_truth_and_errors() -> None:
    item = ChecklistItem("big", "Is it big?", "big", "small", truth="ctr > 0.5")
    assert item_truth(item, "cardiomegaly", {"ctr": 0.6}) is True
    assert item_truth(item, "no_finding", {"ctr": 0.4}) is False
    with pytest.raises(TruthError, match=r"item 'big' \(ctr > 0.5\): unknown metadata key 'ctr'"):
        item_truth(item, "x", {"cup_to_disc": 0.3})
    with pytest.raises(TruthError, match="reserved key 'label'"):
        item_truth(item, "x", {"ctr": 0.6, "label": "y"})
    bare = ChecklistItem("big", "Is it big?", "big", "small")
    with pytest.raises(TruthError, match="item 'big' has no truth expression"):
        item_truth(bare, "x", {"ctr": 0.6})


def test_answers_cover_every_item_of_every_label() -> None:
    knowledge = load_shipped("cxr")
    batch = generate("cxr", 4, seed=1)  # one image per label
    out = answers(knowledge, batch.labels[1], batch.meta[1])  # a cardiomegaly image
    assert set(out) == {(lab, item.id) for lab in knowledge.labels() for item in knowledge.checklist(lab)}
    assert out[("cardiomegaly", "heart_enlarged")] is True
    assert out[("no_finding", "heart_normal_size")] is False
    assert out[("pleural_effusion", "basal_opacity")] is False
    with pytest.raises(TruthError, match="unknown label 'pneumonia'"):
        answers(knowledge, "pneumonia", batch.meta[1])


# --- schema -------------------------------------------------------------------------------------------


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_truth_only_in_phantom_files(tmp_path: Path) -> None:
    data = yaml.safe_load(shipped_path("cxr", "chexpert").read_text())
    label = next(iter(data["labels"]))
    data["labels"][label]["checklist"][1]["truth"] = "ctr > 0.5"
    path = _write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_knowledge(path)
    assert str(info.value) == (
        f"knowledge file {path}: labels.{label}.checklist[1].truth: truth expressions are only allowed in "
        "phantom knowledge files, not for dataset chexpert; remove the key"
    )


@pytest.mark.parametrize(
    ("truth", "problem"),
    [
        ("ctr >", "invalid expression 'ctr >'"),
        ("ctr.real > 0", "Attribute 'ctr.real' is not allowed"),
        ("cup_to_disc > 0.7", "unknown name 'cup_to_disc'"),
        (3, "must be a non-empty string, got 3 (int)"),
    ],
)
def test_bad_truth_names_file_and_item_path(tmp_path: Path, truth: object, problem: str) -> None:
    data = yaml.safe_load(shipped_path("cxr").read_text())
    data["labels"]["nodule"]["checklist"][2]["truth"] = truth
    path = _write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_knowledge(path)
    message = str(info.value)
    assert message.startswith(f"knowledge file {path}: labels.nodule.checklist[2].truth: ")
    assert problem in message


def test_truth_round_trips_and_is_content(tmp_path: Path) -> None:
    knowledge = load_shipped("derm")
    again = load_knowledge(knowledge.save(tmp_path / "derm.yaml"))
    assert again == knowledge
    assert again.checklist("melanoma")[2].truth == "colour_count >= 3"
    data = knowledge.to_dict()
    data["labels"]["melanoma"]["checklist"][2]["truth"] = "colour_count >= 2"
    assert load_knowledge(_write(tmp_path, data)).content_hash() != knowledge.content_hash()


# --- consistency with the generators -------------------------------------------------------------------

N_IMAGES, SEED = 300, 4242
OWN_MIN, OTHER_MIN = 0.97, 0.90


def _yes_rates(modality: str) -> tuple[dict, dict[tuple[str, str], dict[str, float]]]:
    """Per (label, item): share of "yes" among generated images of each label."""
    knowledge = load_shipped(modality)
    batch = generate(modality, N_IMAGES, seed=SEED)
    yes: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    count: dict[str, int] = defaultdict(int)
    for label, meta in zip(batch.labels, batch.meta, strict=True):
        assert set(meta) == META_KEYS[modality]
        count[label] += 1
        for key, value in answers(knowledge, label, meta).items():
            yes[key][label] += value
    return knowledge, {key: {y: yes[key][y] / count[y] for y in count} for key in yes}


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_checklists_hold_for_their_label_and_discriminate(modality: str) -> None:
    knowledge, rates = _yes_rates(modality)
    for label in knowledge.labels():
        for item in knowledge.checklist(label):
            rate = rates[(label, item.id)]
            assert rate[label] >= OWN_MIN, f"{label}.{item.id} true on {rate[label]:.0%} of its own images"
            if item.parent is None:  # roots check that the image is of the modality at all
                continue
            best = max(1 - r for other, r in rate.items() if other != label)
            assert best >= OTHER_MIN, f"{label}.{item.id} is false on at most {best:.0%} of any other label"


@pytest.mark.parametrize("modality", MODALITY_NAMES)
def test_child_items_imply_their_parent(modality: str) -> None:
    knowledge = load_shipped(modality)
    batch = generate(modality, 60, seed=SEED)
    for label_of_image, meta in zip(batch.labels, batch.meta, strict=True):
        out = answers(knowledge, label_of_image, meta)
        for label in knowledge.labels():
            for item in knowledge.checklist(label):
                if item.parent is not None and out[(label, item.id)]:
                    assert out[(label, item.parent)], f"{label}.{item.id} yes but parent {item.parent} no"


def test_every_phantom_item_has_a_truth() -> None:
    for modality in MODALITY_NAMES:
        knowledge = load_shipped(modality)
        missing = [f"{y}.{i.id}" for y in knowledge.labels() for i in knowledge.checklist(y) if i.truth is None]
        assert missing == [], f"{modality}: items without truth: {missing}"
