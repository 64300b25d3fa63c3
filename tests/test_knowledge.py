"""Knowledge files: shipped content, schema validation, round trip, hashing and the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from craft_ray.errors import UserError
from craft_ray.knowledge import (
    MIN_ITEMS,
    MIN_PROMPTS,
    Knowledge,
    load_knowledge,
    load_shipped,
    shipped_files,
    shipped_path,
    validate,
)
from craft_ray.modalities import MODALITIES

ALL_DATASETS = [(m, d) for m, modality in MODALITIES.items() for d in modality.datasets]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cxr_data() -> dict:
    """Parsed content of the shipped cxr phantom file, free to mutate."""
    return yaml.safe_load(shipped_path("cxr", "phantom").read_text())


def write(tmp_path: Path, data: object, name: str = "broken.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("modality", "dataset"), ALL_DATASETS)
def test_shipped_file_validates_and_covers_labels(modality: str, dataset: str) -> None:
    knowledge = load_shipped(modality, dataset)
    assert shipped_path(modality, dataset).name == f"{modality}_{dataset}.yaml"
    assert (knowledge.modality, knowledge.dataset) == (modality, dataset)
    assert knowledge.labels() == MODALITIES[modality].label_names(dataset)
    assert knowledge.version.startswith(f"{dataset}-{modality}-")
    for label in knowledge.labels():
        assert len(knowledge.prompts(label)) >= MIN_PROMPTS
        items = knowledge.checklist(label)
        assert len(items) >= MIN_ITEMS
        assert all(item.question.endswith("?") and item.present != item.absent for item in items)


def test_every_shipped_file_belongs_to_a_dataset() -> None:
    names = {p.name for p in shipped_files()}
    assert names == {f"{m}_{d}.yaml" for m, d in ALL_DATASETS}


def test_phantom_statements_match_the_phantom_world() -> None:
    cxr = load_shipped("cxr")
    enlarged = {item.id: item for item in cxr.checklist("cardiomegaly")}["heart_enlarged"]
    assert "more than half of the thorax width" in enlarged.question
    assert enlarged.parent == "heart_visible"
    fundus = {item.id: item for item in load_shipped("fundus").checklist("glaucoma")}
    assert "0.7" in fundus["large_cup"].question


def test_round_trip_keeps_content_and_hash(tmp_path: Path) -> None:
    original = load_shipped("derm", "phantom")
    saved = original.save(tmp_path / "sub" / "derm.yaml")
    again = load_knowledge(saved)
    assert again == original
    assert again.to_dict() == original.to_dict()
    assert again.content_hash() == original.content_hash()
    assert len(original.content_hash()) == 64


def test_json_round_trip_and_null_parent(tmp_path: Path, cxr_data: dict) -> None:
    cxr_data["labels"]["nodule"]["checklist"][0]["parent"] = None
    knowledge = validate(cxr_data, "mem")
    assert knowledge.checklist("nodule")[0].parent is None
    saved = knowledge.save(tmp_path / "cxr.json")
    assert json.loads(saved.read_text())["labels"]["nodule"]["checklist"][0] == {
        key: cxr_data["labels"]["nodule"]["checklist"][0][key]
        for key in ("id", "question", "present", "absent", "truth")
    }
    assert load_knowledge(saved).content_hash() == load_shipped("cxr").content_hash()


def test_hash_changes_with_content(cxr_data: dict) -> None:
    base = validate(cxr_data, "mem")
    changed = copy.deepcopy(cxr_data)
    changed["labels"]["nodule"]["checklist"][1]["present"] += " in the right lung"
    reordered = copy.deepcopy(cxr_data)
    prompts = reordered["labels"]["nodule"]["prompts"]
    prompts[0], prompts[1] = prompts[1], prompts[0]
    hashes = {
        base.content_hash(),
        validate(changed, "mem").content_hash(),
        validate(reordered, "mem").content_hash(),
    }
    assert len(hashes) == 3
    # The source path is not content: the same data from elsewhere hashes the same.
    assert validate(cxr_data, "other.yaml").content_hash() == base.content_hash()


def test_accessors(cxr_data: dict) -> None:
    knowledge = validate(cxr_data, "mem")
    assert isinstance(knowledge, Knowledge)
    assert knowledge.prompts("nodule")[0] == cxr_data["labels"]["nodule"]["prompts"][0]
    assert [i.id for i in knowledge.checklist("nodule")] == [
        i["id"] for i in cxr_data["labels"]["nodule"]["checklist"]
    ]
    with pytest.raises(UserError, match="unknown label 'pneumonia'.*known: no_finding, cardiomegaly"):
        knowledge.prompts("pneumonia")


def _missing_label(d: dict) -> None:
    del d["labels"]["nodule"]


def _unknown_label(d: dict) -> None:
    d["labels"]["pneumonia"] = d["labels"]["nodule"]


def _few_prompts(d: dict) -> None:
    d["labels"]["cardiomegaly"]["prompts"] = d["labels"]["cardiomegaly"]["prompts"][:3]


def _few_items(d: dict) -> None:
    d["labels"]["cardiomegaly"]["checklist"] = d["labels"]["cardiomegaly"]["checklist"][:2]


def _duplicate_id(d: dict) -> None:
    d["labels"]["nodule"]["checklist"][3]["id"] = "round_opacity"


def _missing_parent(d: dict) -> None:
    d["labels"]["nodule"]["checklist"][2]["parent"] = "lesion_seen"


def _parent_cycle(d: dict) -> None:
    d["labels"]["nodule"]["checklist"][1]["parent"] = "small_size"  # small_size's parent is round_opacity


def _self_parent(d: dict) -> None:
    d["labels"]["nodule"]["checklist"][0]["parent"] = "thorax_visible"


def _unknown_key(d: dict) -> None:
    d["labels"]["cardiomegaly"]["checklist"][2]["presnt"] = "typo"


def _unknown_top_key(d: dict) -> None:
    d["labels_extra"] = {}


def _missing_field(d: dict) -> None:
    del d["labels"]["cardiomegaly"]["checklist"][2]["present"]


def _wrong_type(d: dict) -> None:
    d["labels"]["cardiomegaly"]["checklist"][2]["present"] = 3


def _empty_string(d: dict) -> None:
    d["labels"]["cardiomegaly"]["prompts"][4] = "  "


def _prompts_not_list(d: dict) -> None:
    d["labels"]["cardiomegaly"]["prompts"] = "a chest x-ray"


def _bad_id(d: dict) -> None:
    d["labels"]["nodule"]["checklist"][0]["id"] = "Thorax Visible"


def _not_question(d: dict) -> None:
    d["labels"]["nodule"]["checklist"][0]["question"] = "A thorax is visible."


def _unknown_dataset(d: dict) -> None:
    d["dataset"] = "mimic"


def _version_number(d: dict) -> None:
    d["version"] = 1


BAD_CASES = [
    (_missing_label, "labels", "missing label(s) nodule"),
    (_unknown_label, "labels.pneumonia", "unknown label 'pneumonia'"),
    (_few_prompts, "labels.cardiomegaly.prompts", f"has 3 prompts; at least {MIN_PROMPTS}"),
    (_few_items, "labels.cardiomegaly.checklist", f"has 2 items; at least {MIN_ITEMS}"),
    (_duplicate_id, "labels.nodule.checklist[3].id", "duplicate id 'round_opacity' (also checklist[1])"),
    (_missing_parent, "labels.nodule.checklist[2].parent", "parent 'lesion_seen' is not an item id"),
    (
        _parent_cycle,
        "labels.nodule.checklist[1].parent",
        "parent cycle round_opacity -> small_size -> round_opacity",
    ),
    (_self_parent, "labels.nodule.checklist[0].parent", "parent cycle thorax_visible -> thorax_visible"),
    (_unknown_key, "labels.cardiomegaly.checklist[2].presnt", "unknown key 'presnt'"),
    (_unknown_top_key, "labels_extra", "unknown key 'labels_extra'"),
    (_missing_field, "labels.cardiomegaly.checklist[2].present", "missing required key"),
    (_wrong_type, "labels.cardiomegaly.checklist[2].present", "must be a non-empty string, got 3 (int)"),
    (_empty_string, "labels.cardiomegaly.prompts[4]", "must be a non-empty string, got an empty string"),
    (_prompts_not_list, "labels.cardiomegaly.prompts", "must be a list of strings, got str"),
    (_bad_id, "labels.nodule.checklist[0].id", "must be snake_case"),
    (_not_question, "labels.nodule.checklist[0].question", "ending in '?'"),
    (_unknown_dataset, "dataset", "unknown dataset 'mimic' for modality cxr; known: chexpert, phantom"),
    (_version_number, "version", "must be a non-empty string, got 1 (int)"),
]


@pytest.mark.parametrize(
    ("mutate", "where", "problem"), BAD_CASES, ids=[c[0].__name__[1:] for c in BAD_CASES]
)
def test_bad_content_names_file_path_and_problem(
    tmp_path: Path, cxr_data: dict, mutate, where: str, problem: str
) -> None:
    mutate(cxr_data)
    path = write(tmp_path, cxr_data)
    with pytest.raises(UserError) as info:
        load_knowledge(path)
    message = str(info.value)
    assert message.startswith(f"knowledge file {path}: {where}: ")
    assert problem in message
    assert "\n" not in message


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: x\nlabels: [unclosed\nmodality: cxr\n")
    with pytest.raises(UserError, match=rf"knowledge file {path}: line \d+, column \d+: invalid YAML"):
        load_knowledge(path)


def test_duplicate_yaml_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("version: a\nversion: b\n")
    with pytest.raises(
        UserError, match=rf"knowledge file {path}: line 2, column 1: invalid YAML: duplicate key 'version'"
    ):
        load_knowledge(path)


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match=rf"knowledge file {empty}: top level: file is empty"):
        load_knowledge(empty)
    listing = write(tmp_path, ["a", "b"], "list.yaml")
    with pytest.raises(UserError, match=rf"knowledge file {listing}: top level: must be a mapping.*got list"):
        load_knowledge(listing)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=rf"knowledge file {path} not found"):
        load_knowledge(path)


def test_shipped_path_errors() -> None:
    with pytest.raises(UserError, match="unknown modality 'xray'"):
        shipped_path("xray")
    with pytest.raises(UserError, match="unknown dataset 'mimic'.*known: chexpert, phantom"):
        shipped_path("cxr", "mimic")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-m", "craft_ray.knowledge", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_cli_help_and_list() -> None:
    helped = cli("--help")
    assert helped.returncode == 0
    assert all(cmd in helped.stdout for cmd in ("validate", "show", "list"))
    listed = cli("list")
    assert listed.returncode == 0
    rows = listed.stdout.splitlines()[1:]
    assert len(rows) == len(ALL_DATASETS)
    assert any(row.split()[:3] == ["cxr", "phantom", "phantom-cxr-1"] for row in rows)


def test_cli_show() -> None:
    shown = cli("show", "--modality", "fundus", "--dataset", "aptos2019", "-v")
    assert shown.returncode == 0
    knowledge = load_shipped("fundus", "aptos2019")
    assert f"sha256:      {knowledge.content_hash()}" in shown.stdout
    assert f"version:     {knowledge.version}" in shown.stdout
    for label in knowledge.labels():
        assert label in shown.stdout
    assert knowledge.checklist("severe_dr")[1].question in shown.stdout
    bad = cli("show", "--modality", "cxr", "--dataset", "mimic")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown dataset 'mimic' for modality cxr; known: chexpert, phantom"
    ]


def test_cli_validate(tmp_path: Path, cxr_data: dict) -> None:
    good = shipped_path("cxr", "phantom")
    ok = cli("validate", str(good))
    assert ok.returncode == 0
    assert ok.stdout.startswith(f"OK {good}: phantom-cxr-1 (cxr/phantom, 4 labels, sha256 ")
    _wrong_type(cxr_data)
    broken = write(tmp_path, cxr_data)
    failed = cli("validate", str(good), str(broken))
    assert failed.returncode == 2
    assert failed.stdout.startswith(f"OK {good}")
    assert failed.stderr.strip().splitlines() == [
        f"error: knowledge file {broken}: labels.cardiomegaly.checklist[2].present: "
        "must be a non-empty string, got 3 (int)"
    ]
    usage = cli("validate")
    assert usage.returncode == 2
    assert "the following arguments are required: FILE" in usage.stderr


def test_cli_build_reports_unreachable_judges(tmp_path: Path) -> None:
    out = tmp_path / "draft.yaml"
    # port 9 (discard) on localhost: nothing listens, so the client fails fast and retries are short
    built = cli("build", "--modality", "cxr", "--out", str(out), "--url", "http://127.0.0.1:9")
    assert built.returncode == 2
    message = built.stderr.strip().splitlines()[-1]
    assert message.startswith("error: cannot reach the judges at http://127.0.0.1:9 after 5 attempts (ConnectError")
    assert message.endswith("start them with `python -m craft_ray.serve` or fix judges.url / judges.host / judges.port")
    assert not out.exists()
    usage = cli("build", "--modality", "cxr")
    assert usage.returncode == 2
    assert "the following arguments are required: --out" in usage.stderr
