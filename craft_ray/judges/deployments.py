"""The three model deployments of the judges app: prompt enricher, checklist builder, checklist judge.

Each replica holds one LLM engine (``judges.engine``: transformers | openai | vllm) and runs it on a
single worker thread, so the replica's event loop stays free for Serve's health checks and for
queueing requests while the model computes. JSON answers (prompts, checklists) come from the
engine's schema-constrained generation and are validated again here; P(yes) comes from the
engine's restricted next-token distribution, batched across requests by ``@serve.batch``.
"""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from omegaconf import OmegaConf
from PIL import Image
from ray import serve

from craft_ray.errors import UserError
from craft_ray.modalities import get_modality
from craft_ray.models.engines import Completion, LLMEngine, check_json, make_engine

TOKENS_PER_PROMPT = 64  # generation budget per enriched prompt (one sentence)
TOKENS_PER_ITEM = 160  # generation budget per checklist item (id, question, two captions, parent)
TOKENS_OVERHEAD = 16  # braces and keys around the list
MAX_CHARS = 240  # longest prompt, question or caption the schema allows
DEFAULT_MAX_PAIRS = 16  # ChecklistJudge's batch size before its user_config arrives

SYSTEM = ("You are a clinical imaging expert. You write precise, visually checkable descriptions of "
          "medical images for training and auditing image generators. Answer only with JSON.")


# ---------------------------------------------------------------- JSON schemas and instructions
def prompts_schema(n: int) -> dict:
    """JSON schema of the enricher's answer: exactly ``n`` prompts."""
    return {
        "type": "object",
        "properties": {"prompts": {"type": "array", "minItems": n, "maxItems": n,
                                   "items": {"type": "string", "minLength": 1, "maxLength": MAX_CHARS}}},
        "required": ["prompts"],
        "additionalProperties": False,
    }


def checklist_schema(k: int) -> dict:
    """JSON schema of the checklist builder's answer: exactly ``k`` items."""
    text = {"type": "string", "minLength": 1, "maxLength": MAX_CHARS}
    ident = {"type": "string", "minLength": 1, "maxLength": 40}
    item = {
        "type": "object",
        "properties": {"id": ident, "question": text, "present": text, "absent": text,
                       "parent": {"anyOf": [ident, {"type": "null"}]}},
        "required": ["id", "question", "present", "absent", "parent"],
        "additionalProperties": False,
    }
    return {"type": "object", "properties": {"items": {"type": "array", "minItems": k, "maxItems": k, "items": item}},
            "required": ["items"], "additionalProperties": False}


def enrich_messages(modality: str, display: str, n: int) -> list[dict]:
    """Chat asking for ``n`` enriched text-to-image prompts of one label."""
    mod = get_modality(modality)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": (
        f"Write {n} distinct one-sentence prompts for a text-to-image model, each describing "
        f"{mod.description} of the {mod.anatomy} that shows {display}. Name the visible findings a "
        f"specialist would look for, vary wording and severity, no patient details. "
        f'Answer as {{"prompts": [{n} strings]}}.')}]


def checklist_messages(modality: str, display: str, k: int) -> list[dict]:
    """Chat asking for a ``k``-item clinical checklist of one label."""
    mod = get_modality(modality)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": (
        f"Write a checklist of {k} yes/no questions that verify that {mod.description} shows {display}. "
        "Each item has: id (snake_case), question (answered yes when the image agrees with the label), "
        "present (a caption of such an image where the finding is seen), absent (the same caption where "
        "it is not), parent (the id of an item that must hold first, or null). "
        f'Answer as {{"items": [{k} items]}}.')}]


def normalize_checklist(items: list[dict]) -> list[dict]:
    """Surface clean-up of generated items: snake_case unique ids, questions ending in '?', valid parents.

    Content is never invented: texts are only whitespace-collapsed, an id that is not snake_case is
    slugged (``item_<n>`` when nothing is left), and a parent that names no other item (or would
    close a cycle) is dropped.
    """
    ids: list[str] = []
    alias: dict[str, str] = {}
    for i, item in enumerate(items):
        slug = re.sub(r"[^a-z0-9]+", "_", item["id"].lower()).strip("_")
        if not slug:
            slug = f"item_{i + 1}"
        elif not slug[0].isalpha():
            slug = f"item_{slug}"
        if slug in ids:
            slug = f"{slug}_{i + 1}"
        ids.append(slug)
        alias.setdefault(item["id"], slug)
        alias.setdefault(slug, slug)
    out: list[dict] = []
    parents: dict[str, str | None] = {}
    for item, ident in zip(items, ids, strict=True):
        question = " ".join(item["question"].split()).rstrip(".!")
        if not question.endswith("?"):
            question += "?"
        parent = alias.get(item["parent"]) if item.get("parent") is not None else None
        node = parent
        while node is not None:  # walk up the already-accepted parents: reaching ``ident`` is a cycle
            if node == ident:
                parent = None
                break
            node = parents.get(node)
        parents[ident] = parent
        out.append({"id": ident, "question": question, "present": " ".join(item["present"].split()),
                    "absent": " ".join(item["absent"].split()), "parent": parent})
    return out


# ---------------------------------------------------------------- replicas
class _EngineHost:
    """An engine built from ``judges.engine`` plus the one thread that runs it."""

    def __init__(self, engine_cfg: dict) -> None:
        self.engine: LLMEngine = make_engine(OmegaConf.create(engine_cfg))
        self.temperature = float(engine_cfg.get("temperature", 0.0))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _generate(self, messages: list[dict], schema: dict, max_tokens: int, seed: int | None) -> Any:
        if seed is not None:
            import torch  # the transformers engine samples with torch's global generator

            torch.manual_seed(seed)
        completion = self.engine.generate(messages, max_tokens=max_tokens, temperature=self.temperature,
                                          json_schema=schema)
        return check_json(completion.text, schema)

    def model_id(self) -> str:
        """The engine's model (hub id, folder or served name)."""
        return self.engine.model_id


@serve.deployment
class PromptEnricher(_EngineHost):
    """Enriched text-to-image prompts for a label, as schema-checked JSON from the MLLM."""

    async def enrich(self, modality: str, label: str, dataset: str, n: int, seed: int | None = None) -> list[str]:
        """``n`` prompts describing images of (modality, label); UserError for unknown names."""
        display = get_modality(modality).label(label, dataset).display
        answer = await self._run(self._generate, enrich_messages(modality, display, n), prompts_schema(n),
                                 n * TOKENS_PER_PROMPT + TOKENS_OVERHEAD, seed)
        return [" ".join(p.split()) for p in answer["prompts"]]


@serve.deployment
class ChecklistBuilder(_EngineHost):
    """Clinical checklists ``{id, question, present, absent, parent}`` for a label, from the MLLM."""

    async def build(self, modality: str, label: str, dataset: str, k: int) -> list[dict]:
        """``k`` normalised checklist items of (modality, label)."""
        display = get_modality(modality).label(label, dataset).display
        answer = await self._run(self._generate, checklist_messages(modality, display, k), checklist_schema(k),
                                 k * TOKENS_PER_ITEM + TOKENS_OVERHEAD, None)
        return normalize_checklist(answer["items"])


@serve.deployment
class ChecklistJudge(_EngineHost):
    """P(yes | image, question) batched across requests, plus chat generation for /v1/chat/completions.

    Batches are counted in (image, question) pairs: ``user_config`` ``max_batch_size`` pairs run in
    one engine call; ``max_batch_size=1`` switches batching off. A call's pairs enter the batch queue
    as chunks of at most ``max_batch_size`` pairs (one queue entry per chunk, not per pair: less
    asyncio work per request), and ``batch_size_fn`` makes the queue fill batches by pairs. It is a
    user_config, so ``serve deploy`` of a changed config file applies it to running replicas
    without a restart.
    """

    def __init__(self, engine_cfg: dict) -> None:
        super().__init__(engine_cfg)
        self._stats = {"batches": 0, "pairs": 0, "largest_batch": 0}
        self._max_pairs = DEFAULT_MAX_PAIRS  # until reconfigure() applies the user_config

    def reconfigure(self, user_config: dict) -> None:
        """Apply ``{max_batch_size, batch_wait_timeout_s}`` (Serve calls this on deploy and on updates)."""
        size, wait = user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s")
        if not isinstance(size, int) or size < 1:
            raise UserError(f"ChecklistJudge user_config max_batch_size must be a positive integer, got {size!r}")
        if not isinstance(wait, (int, float)) or wait < 0:
            raise UserError(f"ChecklistJudge user_config batch_wait_timeout_s must be >= 0 seconds, got {wait!r}")
        self._chunks.set_max_batch_size(size)
        self._chunks.set_batch_wait_timeout_s(float(wait))
        self._max_pairs = size

    async def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        """P(yes) per (image, question) pair; pairs of concurrent calls share engine batches."""
        if len(images) != len(questions):
            raise UserError(f"{len(images)} images but {len(questions)} questions; pass one question per image")
        pairs = list(zip(images, questions, strict=True))
        size = self._max_pairs
        chunks = await asyncio.gather(*(self._chunks(pairs[i:i + size]) for i in range(0, len(pairs), size)))
        return [p for chunk in chunks for p in chunk]

    @serve.batch(max_batch_size=DEFAULT_MAX_PAIRS, batch_wait_timeout_s=0.02,  # replaced by reconfigure()
                 batch_size_fn=lambda chunks: sum(len(c) for c in chunks))
    async def _chunks(self, chunks: list[list[tuple[Image.Image, str]]]) -> list[list[float]]:
        pairs = [p for chunk in chunks for p in chunk]
        values = await self._run(self.engine.p_yes, [p[0] for p in pairs], [p[1] for p in pairs])
        self._stats["batches"] += 1
        self._stats["pairs"] += len(pairs)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(pairs))
        out, start = [], 0
        for chunk in chunks:
            out.append(values[start:start + len(chunk)])
            start += len(chunk)
        return out

    async def generate(self, messages: list[dict], kwargs: dict) -> Completion:
        """One chat completion (OpenAI semantics) from the judge's engine."""
        return await self._run(lambda: self.engine.generate(messages, **kwargs))

    def stats(self) -> dict:
        """Batches and pairs judged by this replica, and its process id."""
        return {**self._stats, "pid": os.getpid()}
