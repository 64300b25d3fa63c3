"""Clinical knowledge files: enriched prompts and checklists per label, their schema and loading.

A knowledge file is YAML (or JSON, a subset of YAML), one per (modality, dataset)::

    version: phantom-cxr-1          # bump whenever the content changes
    modality: cxr                   # cxr | derm | fundus | histo
    dataset: phantom                # a dataset of that modality in craft_ray.modalities
    description: free text
    labels:
      cardiomegaly:
        prompts: [...]              # >= 8 enriched descriptions (CAS label dimension)
        checklist:                  # >= 4 items (CAS checklist dimension, MLLM judge)
          - id: enlarged_heart      # snake_case, unique within the label
            question: Does the cardiac silhouette span more than half of the thorax width?
            present: a chest x-ray whose heart ...   # caption when the finding is seen (CLIP)
            absent: a chest x-ray whose heart ...    # caption when it is not
            parent: thorax_visible  # optional: gate on another item of the label (DSG-style)
            truth: ctr > 0.5        # phantom files only: the answer from the generator's metadata

``present`` always states what an image of the label *should* show, so a satisfied item means
alignment. ``truth`` (allowed only when ``dataset`` is ``phantom``) is a boolean expression over
the phantom metadata keys and ``label`` (see :mod:`craft_ray.data.phantom.truth`); it answers the
question for a generated image and is what the tiny judge of the embedded default learns from.
Files ship in ``craft_ray/knowledge_files/<modality>_<dataset>.yaml``.
Run ``python -m craft_ray.knowledge --help`` to validate, show and list them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from craft_ray.cli import Parser, run
from craft_ray.data.phantom.truth import TruthError, names_for, parse
from craft_ray.errors import UserError, one_of
from craft_ray.modalities import MODALITY_NAMES, get_modality

KNOWLEDGE_DIR = Path(__file__).parent / "knowledge_files"
MIN_PROMPTS = 8  # enriched prompts per label
MIN_ITEMS = 4  # checklist items per label

TOP_KEYS = ("version", "modality", "dataset", "description", "labels")
LABEL_KEYS = ("prompts", "checklist")
ITEM_KEYS = ("id", "question", "present", "absent", "parent", "truth")
ITEM_REQUIRED = ("id", "question", "present", "absent")
_ID = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ChecklistItem:
    """One yes/no clinical check: a question for the MLLM judge and present/absent captions for CLIP."""

    id: str  # snake_case, unique within its label
    question: str  # yes/no question; "yes" means the image agrees with the label
    present: str  # caption stating the expected finding is present
    absent: str  # caption stating it is absent
    parent: str | None = None  # id of the gating item of the same label (a "no" there zeroes this one)
    truth: str | None = None  # phantom only: boolean expression over the generator's metadata and `label`

    def to_dict(self) -> dict[str, str]:
        """Plain mapping in file order; ``parent`` and ``truth`` only when set."""
        out = {"id": self.id, "question": self.question, "present": self.present, "absent": self.absent}
        if self.parent is not None:
            out["parent"] = self.parent
        if self.truth is not None:
            out["truth"] = self.truth
        return out


@dataclass(frozen=True)
class LabelKnowledge:
    """Enriched prompts and checklist of one label."""

    prompts: tuple[str, ...]
    checklist: tuple[ChecklistItem, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping in file order."""
        return {"prompts": list(self.prompts), "checklist": [item.to_dict() for item in self.checklist]}


@dataclass(frozen=True)
class Knowledge:
    """A validated knowledge file: per-label prompts and checklists of one (modality, dataset)."""

    version: str
    modality: str
    dataset: str
    description: str
    entries: dict[str, LabelKnowledge]  # label -> knowledge, in the dataset's class-index order
    source: str | None = field(default=None, compare=False)  # file it was read from, for messages

    def labels(self) -> list[str]:
        """Label identifiers in the dataset's class-index order."""
        return list(self.entries)

    def _entry(self, label: str) -> LabelKnowledge:
        if label not in self.entries:
            raise one_of("label", label, self.labels(), f"in knowledge {self.version}")
        return self.entries[label]

    def prompts(self, label: str) -> list[str]:
        """The enriched prompts of ``label``."""
        return list(self._entry(label).prompts)

    def checklist(self, label: str) -> list[ChecklistItem]:
        """The checklist items of ``label`` in file order."""
        return list(self._entry(label).checklist)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping with the file's keys and order (what :meth:`save` writes)."""
        return {
            "version": self.version,
            "modality": self.modality,
            "dataset": self.dataset,
            "description": self.description,
            "labels": {name: entry.to_dict() for name, entry in self.entries.items()},
        }

    def content_hash(self) -> str:
        """sha256 hex digest of the canonical content; ties CAS thresholds to this exact knowledge."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the knowledge to ``path`` as YAML, or JSON for a ``.json`` suffix; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)
        path.write_text(text, encoding="utf-8")
        return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _fail(source: str, where: str, problem: str) -> UserError:
    return UserError(f"knowledge file {source}: {where}: {problem}")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: object, source: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else f"{value!r} ({_type_name(value)})"
        raise _fail(source, where, f"must be a non-empty string, got {got}")
    return value.strip()


def _mapping(value: object, source: str, where: str, allowed: Sequence[str], required: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        raise _fail(
            source,
            where or "top level",
            f"must be a mapping with keys {', '.join(required)}, got {_type_name(value)}",
        )
    for key in value:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            raise _fail(source, path, f"unknown key {key!r}; allowed keys: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            path = f"{where}.{key}" if where else key
            raise _fail(source, path, "missing required key")
    return value


def _truth(value: object, source: str, where: str, names: frozenset[str] | None, dataset: str) -> str:
    if names is None:
        raise _fail(
            source,
            where,
            f"truth expressions are only allowed in phantom knowledge files, not for dataset {dataset}; "
            "remove the key",
        )
    text = _text(value, source, where)
    try:
        parse(text, names)
    except TruthError as exc:
        raise _fail(source, where, str(exc)) from exc
    return text


def _item(
    value: object, source: str, where: str, names: frozenset[str] | None, dataset: str
) -> ChecklistItem:
    raw = _mapping(value, source, where, ITEM_KEYS, ITEM_REQUIRED)
    fields = {key: _text(raw[key], source, f"{where}.{key}") for key in ITEM_REQUIRED}
    if not _ID.match(fields["id"]):
        raise _fail(source, f"{where}.id", f"id {fields['id']!r} must be snake_case (a-z, 0-9, _)")
    if not fields["question"].endswith("?"):
        raise _fail(
            source, f"{where}.question", f"{fields['question']!r} must be a yes/no question ending in '?'"
        )
    # null parent = no gating: structured JSON from the checklist builder spells "none" that way
    parent = _text(raw["parent"], source, f"{where}.parent") if raw.get("parent") is not None else None
    truth = _truth(raw["truth"], source, f"{where}.truth", names, dataset) if raw.get("truth") is not None else None
    return ChecklistItem(parent=parent, truth=truth, **fields)


def _check_parents(items: list[ChecklistItem], source: str, where: str) -> None:
    index = {item.id: i for i, item in enumerate(items)}
    for i, item in enumerate(items):
        if item.parent is not None and item.parent not in index:
            raise _fail(
                source,
                f"{where}[{i}].parent",
                f"parent {item.parent!r} is not an item id of this label; ids: {', '.join(index)}",
            )
    parents = {item.id: item.parent for item in items}
    for i, item in enumerate(items):
        chain = [item.id]
        node = item.parent
        while node is not None:
            chain.append(node)
            if node == item.id:
                raise _fail(
                    source,
                    f"{where}[{i}].parent",
                    f"parent cycle {' -> '.join(chain)}; gating must form a tree",
                )
            if node in chain[:-1]:  # a cycle further up; reported when the loop reaches one of its members
                break
            node = parents[node]


def _label(
    value: object, source: str, where: str, names: frozenset[str] | None, dataset: str
) -> LabelKnowledge:
    raw = _mapping(value, source, where, LABEL_KEYS, LABEL_KEYS)
    prompts_raw, items_raw = raw["prompts"], raw["checklist"]
    if not isinstance(prompts_raw, list):
        raise _fail(source, f"{where}.prompts", f"must be a list of strings, got {_type_name(prompts_raw)}")
    if len(prompts_raw) < MIN_PROMPTS:
        raise _fail(
            source, f"{where}.prompts", f"has {len(prompts_raw)} prompts; at least {MIN_PROMPTS} are required"
        )
    prompts: list[str] = []
    for i, prompt in enumerate(prompts_raw):
        text = _text(prompt, source, f"{where}.prompts[{i}]")
        if text in prompts:
            raise _fail(
                source, f"{where}.prompts[{i}]", f"duplicate prompt (same as prompts[{prompts.index(text)}])"
            )
        prompts.append(text)
    if not isinstance(items_raw, list):
        raise _fail(source, f"{where}.checklist", f"must be a list of items, got {_type_name(items_raw)}")
    if len(items_raw) < MIN_ITEMS:
        raise _fail(
            source, f"{where}.checklist", f"has {len(items_raw)} items; at least {MIN_ITEMS} are required"
        )
    items: list[ChecklistItem] = []
    for i, raw_item in enumerate(items_raw):
        item = _item(raw_item, source, f"{where}.checklist[{i}]", names, dataset)
        ids = [prev.id for prev in items]
        if item.id in ids:
            raise _fail(
                source,
                f"{where}.checklist[{i}].id",
                f"duplicate id {item.id!r} (also checklist[{ids.index(item.id)}])",
            )
        items.append(item)
    _check_parents(items, source, f"{where}.checklist")
    return LabelKnowledge(prompts=tuple(prompts), checklist=tuple(items))


def validate(data: object, source: str = "<memory>") -> Knowledge:
    """Check parsed knowledge content against the schema and its dataset's labels; returns it typed.

    Raises UserError naming ``source``, the path inside the content (``labels.x.checklist[2].present``)
    and the problem.
    """
    if data is None:
        raise _fail(source, "top level", f"file is empty; expected a mapping with keys {', '.join(TOP_KEYS)}")
    raw = _mapping(data, source, "", TOP_KEYS, TOP_KEYS)
    version = _text(raw["version"], source, "version")
    modality_name = _text(raw["modality"], source, "modality")
    if modality_name not in MODALITY_NAMES:
        raise _fail(
            source, "modality", f"unknown modality {modality_name!r}; known: {', '.join(MODALITY_NAMES)}"
        )
    modality = get_modality(modality_name)
    dataset = _text(raw["dataset"], source, "dataset")
    if dataset not in modality.datasets:
        known = ", ".join(sorted(modality.datasets))
        raise _fail(
            source, "dataset", f"unknown dataset {dataset!r} for modality {modality_name}; known: {known}"
        )
    description = _text(raw["description"], source, "description")
    labels_raw = raw["labels"]
    if not isinstance(labels_raw, dict):
        raise _fail(
            source,
            "labels",
            f"must be a mapping label -> {{prompts, checklist}}, got {_type_name(labels_raw)}",
        )
    expected = modality.label_names(dataset)
    for name in labels_raw:
        if name not in expected:
            raise _fail(
                source,
                f"labels.{name}",
                f"unknown label {name!r} for {modality_name} ({dataset}); known: {', '.join(expected)}",
            )
    missing = [name for name in expected if name not in labels_raw]
    if missing:
        raise _fail(
            source,
            "labels",
            f"missing label(s) {', '.join(missing)} of {modality_name} ({dataset}); every label needs an entry",
        )
    names = names_for(modality_name) if dataset == "phantom" else None
    entries = {name: _label(labels_raw[name], source, f"labels.{name}", names, dataset) for name in expected}
    return Knowledge(version, modality_name, dataset, description, entries, source=source)


def load_knowledge(path: str | Path) -> Knowledge:
    """Read and validate a knowledge YAML (or JSON) file; every problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"knowledge file {path} not found (no such file); pass an existing YAML file")
    try:
        data = yaml.load(
            path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader
        )  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "top level"
        problem = getattr(exc, "problem", None) or str(exc)
        raise _fail(str(path), where, f"invalid YAML: {' '.join(str(problem).split())}") from exc
    except UnicodeDecodeError as exc:
        raise _fail(str(path), "top level", f"not UTF-8 text ({exc.reason})") from exc
    return validate(data, str(path))


def shipped_path(modality: str, dataset: str = "phantom") -> Path:
    """Path of the shipped knowledge file of (modality, dataset); UserError when none ships."""
    get_modality(modality).labels(dataset)  # unknown modality or dataset: error listing the known ones
    path = KNOWLEDGE_DIR / f"{modality}_{dataset}.yaml"
    if not path.is_file():
        shipped = ", ".join(p.stem for p in shipped_files()) or "none"
        raise UserError(
            f"no shipped knowledge file for modality {modality}, dataset {dataset} (shipped: {shipped}); "
            "write one and pass knowledge.path=FILE"
        )
    return path


def shipped_files() -> list[Path]:
    """All shipped knowledge files, sorted by name."""
    return sorted(KNOWLEDGE_DIR.glob("*.yaml"))


def load_shipped(modality: str, dataset: str = "phantom") -> Knowledge:
    """Load the shipped knowledge of (modality, dataset)."""
    return load_knowledge(shipped_path(modality, dataset))


def load_knowledge_for(cfg: Any) -> Knowledge:
    """The knowledge file of a config: ``knowledge.path`` or the shipped one for (modality, dataset)."""
    know = load_knowledge(cfg.knowledge.path) if cfg.knowledge.path else load_shipped(cfg.modality, cfg.data.dataset)
    if know.modality != cfg.modality or know.dataset != cfg.data.dataset:
        raise UserError(
            f"knowledge file {cfg.knowledge.path!r} is for {know.modality}/{know.dataset}, but the run is "
            f"{cfg.modality}/{cfg.data.dataset}"
        )
    return know


def checklist_judge(p_yes: Any, item_ids: Sequence[str], parents: Mapping[str, str | None],
                    *, gating: bool = False, threshold: float = 0.5) -> np.ndarray:
    """Non-differentiable checklist twin from judge answers.

    p_yes [B,K]: P(yes | image, item question) from the MLLM judge for the K items ``item_ids``.
    Score = mean over items of P(yes); with DSG-style ``gating`` a child item counts 0 when its
    parent is answered no (parent P(yes) < threshold). Returns [B].
    """
    p = np.array(p_yes.detach().cpu() if hasattr(p_yes, "detach") else p_yes, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(item_ids):
        raise UserError(f"p_yes must be [images, {len(item_ids)} items], got shape {p.shape}")
    if gating:
        col = {item: j for j, item in enumerate(item_ids)}
        for j, item in enumerate(item_ids):
            ancestor = parents.get(item)
            seen = set()
            while ancestor is not None and ancestor not in seen:
                seen.add(ancestor)
                if ancestor in col:
                    p[:, j] = np.where(p[:, col[ancestor]] < threshold, 0.0, p[:, j])
                ancestor = parents.get(ancestor)
    return p.mean(axis=1)


def _summary(knowledge: Knowledge, verbose: bool) -> list[str]:
    lines = [
        f"file:        {knowledge.source}",
        f"version:     {knowledge.version}",
        f"modality:    {knowledge.modality} (dataset {knowledge.dataset})",
        f"sha256:      {knowledge.content_hash()}",
        f"description: {' '.join(knowledge.description.split())}",
        f"{'label':<24} {'prompts':>7} {'items':>5} {'gated':>5}",
    ]
    for name in knowledge.labels():
        items = knowledge.checklist(name)
        gated = sum(item.parent is not None for item in items)
        lines.append(f"{name:<24} {len(knowledge.prompts(name)):>7} {len(items):>5} {gated:>5}")
        if verbose:
            parents = {item.id: item.parent for item in items}
            for item in items:
                depth, node = 1, item.parent
                while node is not None:  # validated: parents exist and form a tree
                    depth, node = depth + 1, parents[node]
                truth = f"  (truth: {item.truth})" if item.truth is not None else ""
                lines.append(f"{'  ' * depth}- [{item.id}] {item.question}{truth}")
    return lines


def _cmd_validate(ns: argparse.Namespace) -> int:
    failed = 0
    for file in ns.files:
        try:
            knowledge = load_knowledge(file)
        except UserError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        counts = f"{len(knowledge.labels())} labels"
        print(
            f"OK {file}: {knowledge.version} ({knowledge.modality}/{knowledge.dataset}, {counts}, "
            f"sha256 {knowledge.content_hash()[:12]})"
        )
    return 2 if failed else 0


def _cmd_show(ns: argparse.Namespace) -> int:
    print("\n".join(_summary(load_shipped(ns.modality, ns.dataset), ns.verbose)))
    return 0


def _cmd_list(ns: argparse.Namespace) -> int:
    print(f"{'modality':<8} {'dataset':<12} {'version':<22} {'labels':>6}  file")
    for path in shipped_files():
        knowledge = load_knowledge(path)
        print(
            f"{knowledge.modality:<8} {knowledge.dataset:<12} {knowledge.version:<22} "
            f"{len(knowledge.labels()):>6}  {path}"
        )
    return 0


def build(judges: Any, modality: str, dataset: str = "phantom", *, n_prompts: int = MIN_PROMPTS,
          k_items: int = 6, seed: int | None = None, model: str = "the judges") -> dict[str, Any]:
    """Draft knowledge content of (modality, dataset) from the enricher and checklist builder, for review.

    ``judges`` is a judges client (:mod:`craft_ray.judges.client`): ``enrich`` and ``checklist`` per label.
    Repeated prompts are dropped, so a label can end with fewer than ``n_prompts``; :func:`validate`
    then says which.
    """
    mod = get_modality(modality)
    labels: dict[str, Any] = {}
    for name in mod.label_names(dataset):
        prompts = list(dict.fromkeys(judges.enrich(modality, name, n_prompts, seed=seed, dataset=dataset)))
        items = judges.checklist(modality, name, k_items, dataset=dataset)
        labels[name] = {"prompts": prompts,
                        "checklist": [{k: v for k, v in it.items() if v is not None} for it in items]}
        print(f"  {name}: {len(prompts)} prompts, {len(items)} checklist items", file=sys.stderr)
    stamp = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:8]
    return {
        "version": f"{dataset}-{modality}-draft-{stamp}",
        "modality": modality,
        "dataset": dataset,
        "description": f"DRAFT built by {model} through the judges API for {mod.description}; "
                       "a person must review every prompt and checklist item before use.",
        "labels": labels,
    }


def _cmd_build(ns: argparse.Namespace) -> int:
    from craft_ray.judges.client import JudgesClient

    out = Path(ns.out)
    with JudgesClient(ns.url, token=os.environ.get(ns.token_env) or None, timeout_s=ns.timeout) as judges:
        model = ", ".join(judges.models())
        print(f"building {ns.modality}/{ns.dataset} knowledge with {model} at {ns.url}", file=sys.stderr)
        data = build(judges, ns.modality, ns.dataset, n_prompts=ns.prompts, k_items=ns.items, seed=ns.seed,
                     model=model)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n" if out.suffix == ".json" else \
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=110)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    try:
        knowledge = validate(data, str(out))
    except UserError as exc:
        raise UserError(f"draft written to {out} but it does not validate yet; fix it by hand: {exc}") from exc
    print(f"wrote {out}: {knowledge.version}, {len(knowledge.labels())} labels; review it before use")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m craft_ray.knowledge`` parser with its subcommands."""
    parser = Parser(
        prog="python -m craft_ray.knowledge",
        description="Validate, show, list and build clinical knowledge files (enriched prompts + checklists).",
        epilog="examples:\n"
        "  python -m craft_ray.knowledge list\n"
        "  python -m craft_ray.knowledge show --modality cxr --dataset chexpert -v\n"
        "  python -m craft_ray.knowledge validate my_cxr.yaml\n"
        "  python -m craft_ray.knowledge build --modality derm --out derm_draft.yaml --url http://127.0.0.1:8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check knowledge files against the schema and their dataset's labels")
    p.add_argument("files", nargs="+", metavar="FILE", help="knowledge YAML files")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("show", help="summarise the shipped file of a modality and dataset")
    p.add_argument("--modality", required=True, choices=MODALITY_NAMES, help="cxr | derm | fundus | histo")
    p.add_argument("--dataset", default="phantom", help="label set of the modality (default: phantom)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every checklist question")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("list", help="list the shipped knowledge files")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("build", help="draft a knowledge file through the judges (enricher, checklist builder)")
    p.add_argument("--modality", required=True, choices=MODALITY_NAMES, help="cxr | derm | fundus | histo")
    p.add_argument("--dataset", default="phantom", help="label set of the modality (default: phantom)")
    p.add_argument("--out", required=True, metavar="FILE", help="knowledge file to write (.yaml or .json)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="judges base URL (python -m craft_ray.serve)")
    p.add_argument("--token-env", default="CRAFT_JUDGES_TOKEN", help="environment variable with the bearer token")
    p.add_argument("--prompts", type=int, default=MIN_PROMPTS, help=f"prompts per label (default {MIN_PROMPTS})")
    p.add_argument("--items", type=int, default=6, help="checklist items per label (default 6)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed passed to the enricher")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.set_defaults(func=_cmd_build)

    for subparser in sub.choices.values():
        subparser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``python -m craft_ray.knowledge``; returns the exit code."""
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    run(main)
