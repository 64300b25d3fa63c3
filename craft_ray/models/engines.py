"""LLM engines for the judges: chat generation (optionally JSON-schema constrained) and batched P(yes).

Three implementations behind one interface (:class:`LLMEngine`), chosen by ``judges.engine.kind``:

- ``transformers``: an in-process HF model (text LM or vision-language model), CPU or GPU; JSON
  output is guaranteed by :mod:`craft_ray.models.json_constrained`.
- ``openai``: any OpenAI-compatible server (``ray.serve.llm`` with vLLM, ``vllm serve``, a hosted
  API) through the official client, with timeouts and retries; JSON via ``response_format``.
- ``vllm``: an in-process ``vllm.LLM`` (GPU, ``pip install 'craft_ray[vllm]'``); JSON via
  structured outputs. It shares the wire helpers below with the ``openai`` engine.

Messages are OpenAI chat messages. Images travel only as ``data:image/...;base64`` URLs: local
paths, ``file://`` and ``http(s)://`` URLs are refused, so a request can never make a judge read a
file or fetch from the network.

P(yes) is read from the next-token distribution after the yes/no prompt, restricted to the token
variants of "yes" and "no" (any token whose text, stripped and lower-cased, is ``yes``/``no``):
P(yes) = mass(yes) / (mass(yes) + mass(no)); free text is never parsed. Served engines only see
the top-k alternatives of the first token: a group absent from them counts as mass 0 (its true
mass is below the k-th alternative's); when both are absent the engine raises :class:`EngineError`
rather than guess.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from craft_ray.errors import UserError
from craft_ray.models.json_constrained import JsonGrammar, TokenConstraint

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from craft_ray.config import EngineConfig

Message = dict[str, Any]  # OpenAI chat message: {"role": ..., "content": str | [parts]}

ROLES = ("system", "user", "assistant")
YES_NO_INSTRUCTION = "Answer yes or no."
MAX_TOP_LOGPROBS = 20  # OpenAI's limit; vLLM's default max_logprobs


class EngineError(RuntimeError):
    """An engine answered with something unusable (no yes/no alternatives, JSON that breaks the schema)."""


@dataclass
class TokenLogprob:
    """One generated token, its log-probability and the top alternatives at that position."""

    token: str
    logprob: float
    top_logprobs: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """The result of :meth:`LLMEngine.generate`."""

    text: str
    finish_reason: str  # stop | length
    usage: Usage
    tokens: list[TokenLogprob] = field(default_factory=list)  # filled when logprobs were asked for

    def json(self) -> Any:
        """The text parsed as JSON (raises EngineError when it is not JSON)."""
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as exc:
            raise EngineError(f"engine output is not JSON ({exc}): {self.text[:200]!r}") from exc


class LLMEngine(ABC):
    """What a judge needs from a language model."""

    model_id: str

    @abstractmethod
    def generate(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        json_schema: dict | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Completion:
        """Answer a chat; with ``json_schema`` the text is a JSON document valid under it."""

    @abstractmethod
    def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        """P(yes) in [0, 1] for each (image, question) pair, from the restricted next-token distribution."""


# ---------------------------------------------------------------- messages and images
def image_to_data_url(image: Image.Image) -> str:
    """PNG data URL of a PIL image (what requests carry)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_url(url: str) -> Image.Image:
    """RGB PIL image from a ``data:image/...;base64,`` URL; anything else is refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:80] if isinstance(url, str) else type(url).__name__
        raise UserError(
            f"image_url {shown!r} is not a data URL; send images inline as 'data:image/png;base64,...' "
            "(local paths, file:// and http(s):// URLs are refused: a judge never reads files or fetches URLs)"
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise UserError(f"image data URL header {header[:60]!r} must look like 'data:image/png;base64'")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserError(f"image data URL has invalid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"image data URL does not hold a readable image ({exc})") from exc


def check_messages(messages: Any) -> list[Message]:
    """Validate OpenAI chat messages (roles, text parts, data-URL image parts); returns them unchanged."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            role = msg.get("role") if isinstance(msg, dict) else msg
            raise UserError(f"messages[{i}] has role {role!r}; known: {', '.join(ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise UserError(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url" and isinstance(part.get("image_url"), dict):
                decode_data_url(part["image_url"].get("url"))
                continue
            raise UserError(
                f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image_url', 'image_url': {{'url': 'data:image/...'}}}}, got {str(part)[:80]}"
            )
    return messages


def yes_no_text(question: str) -> str:
    """The user text of a yes/no judgement (shared by inference and training)."""
    return f"{question.strip()} {YES_NO_INSTRUCTION}"


def yes_no_messages(image: Image.Image, question: str) -> list[Message]:
    """OpenAI chat messages asking ``question`` about ``image`` for a yes/no answer."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_to_data_url(image)}},
        {"type": "text", "text": yes_no_text(question)},
    ]}]


def yes_no_group(token: str) -> str | None:
    """'yes' / 'no' when the token text is a variant of the word ("Yes", " yes", "▁no"), else None."""
    # Some servers return raw SentencePiece ("\u2581") or byte-level BPE ("\u0120") pieces.
    word = token.replace("\u2581", " ").replace("\u0120", " ").strip().lower()
    return word if word in ("yes", "no") else None


def p_yes_from_top_logprobs(alternatives: list[tuple[str, float]]) -> float:
    """P(yes) from the (token, logprob) alternatives of the first answer token."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in alternatives:
        group = yes_no_group(token)
        if group is not None:
            mass[group] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    if total <= 0.0:
        shown = ", ".join(repr(t) for t, _ in alternatives[:8])
        raise EngineError(
            f"neither 'yes' nor 'no' is among the top {len(alternatives)} first tokens ({shown}); "
            "the model does not follow the yes/no prompt"
        )
    return mass["yes"] / total


def check_json(text: str, schema: dict) -> Any:
    """Parse ``text`` and validate it against ``schema`` (EngineError naming the violation)."""
    import jsonschema  # a dependency of ray

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"engine output is not JSON ({exc}): {text[:200]!r}") from exc
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise EngineError(f"engine output breaks the JSON schema: {exc.message}; output {text[:200]!r}") from exc
    return value


# ---------------------------------------------------------------- OpenAI wire format (client and server)
def response_format(schema: dict, name: str = "response") -> dict:
    """OpenAI ``response_format`` asking for JSON valid under ``schema``.

    Hosted OpenAI models in strict mode also require every property to be listed in ``required`` and
    ``additionalProperties: false``; vLLM and the judges accept any schema their grammar supports.
    """
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat_request(
    model: str,
    messages: list[Message],
    *,
    max_tokens: int,
    temperature: float,
    json_schema: dict | None,
    logprobs: bool,
    top_logprobs: int,
) -> dict:
    """Body of a /v1/chat/completions request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_completion_tokens": max_tokens,
        "temperature": temperature,
    }
    if logprobs:
        body.update(logprobs=True, top_logprobs=top_logprobs)
    if json_schema is not None:
        body["response_format"] = response_format(json_schema)
    return body


def parse_chat_request(body: Any, default_max_tokens: int) -> tuple[list[Message], dict]:
    """Server side: messages and :meth:`LLMEngine.generate` keyword arguments from a request body."""
    if not isinstance(body, dict):
        raise UserError("request body must be a JSON object")
    if body.get("n", 1) != 1 or body.get("stream", False):
        raise UserError("only n=1 and stream=false are supported")
    messages = check_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    top = body.get("top_logprobs") or 0
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise UserError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise UserError(f"temperature must be a number in [0, 2], got {temperature!r}")
    schema = None
    fmt = body.get("response_format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise UserError(f"response_format must be an object like {{'type': 'json_schema', ...}}, got {fmt!r}")
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise UserError("response_format.json_schema.schema must be a JSON schema object")
    elif fmt.get("type") != "text":
        raise UserError(f"response_format type {fmt.get('type')!r} is not supported; use 'text' or 'json_schema'")
    return messages, {
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "json_schema": schema,
        "logprobs": bool(body.get("logprobs", False)),
        "top_logprobs": top,
    }


def chat_response(completion: Completion, model: str, *, logprobs: bool, request_id: str = "chatcmpl-0") -> dict:
    """Server side: an OpenAI chat.completion object for ``completion``."""
    content = None
    if logprobs:
        content = [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": a, "logprob": lp, "bytes": list(a.encode("utf-8"))} for a, lp in t.top_logprobs
                ],
            }
            for t in completion.tokens
        ]
    usage = asdict(completion.usage)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": {"content": content} if logprobs else None,
            "finish_reason": completion.finish_reason,
        }],
        "usage": usage,
    }


def parse_chat_response(body: dict) -> Completion:
    """Client side: a :class:`Completion` from an OpenAI chat.completion object (a dict)."""
    choice = body["choices"][0]
    tokens = [
        TokenLogprob(t["token"], float(t["logprob"]),
                     [(a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []])
        for t in ((choice.get("logprobs") or {}).get("content") or [])
    ]
    usage = body.get("usage") or {}
    return Completion(
        text=choice["message"].get("content") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
        tokens=tokens,
    )


# ---------------------------------------------------------------- transformers
def token_texts(tokenizer: Any) -> list[str | None]:
    """Text each token id adds after other text; None for special/added tokens and partial characters."""
    # Decoding (anchor, token) pairs keeps leading spaces that SentencePiece strips from a lone token.
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    anchor_text = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    size = len(tokenizer)
    decoded = tokenizer.batch_decode(
        [[anchor, i] for i in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    texts: list[str | None] = []
    for i, text in enumerate(decoded):
        piece = text[len(anchor_text):] if text.startswith(anchor_text) else None
        ok = piece and i not in excluded and "\ufffd" not in piece
        texts.append(piece if ok else None)
    return texts


class _Picker(LogitsProcessor):
    """Logits processor for ``model.generate``: picks each token itself (grammar, budget, temperature)."""

    def __init__(self, constraint: TokenConstraint | None, prompt_len: int, max_tokens: int,
                 temperature: float, eos_ids: list[int]) -> None:
        self.constraint = constraint
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.eos_ids = eos_ids
        self.state = constraint.grammar.initial if constraint else None
        self.fed = 0  # generated tokens already fed to the grammar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.prompt_len:].tolist()
        if self.constraint is not None:
            for tid in generated[self.fed:]:
                self.state = self.constraint.next_state(self.state, tid)
            self.fed = len(generated)
            tid = self.constraint.pick(scores[0], self.state, self.max_tokens - len(generated), self.temperature)
        elif self.temperature > 0:
            tid = int(torch.multinomial(torch.softmax(scores[0].float() / self.temperature, dim=-1), 1))
        else:
            tid = int(scores[0].argmax())
        out = torch.full_like(scores, -float("inf"))
        out[0, tid] = 0.0
        return out


class TransformersEngine(LLMEngine):
    """In-process HF model: a text LM or an image-text-to-text model (Llava, Qwen2.5-VL, ...)."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 256,
                 batch_size: int = 16) -> None:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        self.model_id = model
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        try:
            config = AutoConfig.from_pretrained(model)
            self.multimodal = hasattr(config, "vision_config")
            if self.multimodal:
                self.processor = AutoProcessor.from_pretrained(model)
                self.tokenizer = self.processor.tokenizer
                loader = AutoModelForImageTextToText
            else:
                self.processor = self.tokenizer = AutoTokenizer.from_pretrained(model)
                loader = AutoModelForCausalLM
            torch_dtype = _torch_dtype(dtype, self.device)
            self.model = loader.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        except OSError as exc:
            raise UserError(
                f"cannot load judge model {model!r}: {str(exc).splitlines()[0]}; build the tiny one with "
                "`python -m craft_ray.bootstrap` or set judges.engine.model to a local folder or hub id"
            ) from exc
        if getattr(self.processor, "chat_template", None) is None:
            raise UserError(f"judge model {model!r} has no chat template; use an instruction-tuned model")
        self.dtype = next(self.model.parameters()).dtype
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.eos_ids[0] if self.eos_ids else 0)
        self._texts: list[str | None] | None = None
        self._yes_no: tuple[torch.Tensor, torch.Tensor] | None = None
        self._constraints: dict[str, TokenConstraint] = {}
        self._yes_no_prompts: dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg: EngineConfig | DictConfig) -> TransformersEngine:
        """Engine from ``judges.engine``."""
        return cls(cfg.model, device=cfg.device, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size)

    @property
    def texts(self) -> list[str | None]:
        """Per-token texts (computed once, lazily: a few hundred ms for a 150k vocabulary)."""
        if self._texts is None:
            self._texts = token_texts(self.tokenizer)
        return self._texts

    def _hf_messages(self, messages: list[Message]) -> tuple[list[dict], list[Image.Image]]:
        """OpenAI messages -> HF chat-template messages and the decoded images in order."""
        images: list[Image.Image] = []
        out = []
        for msg in check_messages(messages):
            content = msg["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
            for part in [] if isinstance(content, str) else content:
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    images.append(decode_data_url(part["image_url"]["url"]))
                    parts.append({"type": "image"})
            if not self.multimodal:
                if images:
                    raise UserError(f"judge model {self.model_id!r} is text-only and cannot read images")
                out.append({"role": msg["role"], "content": "".join(p["text"] for p in parts)})
            else:
                out.append({"role": msg["role"], "content": parts})
        return out, images

    def _render(self, conversation: list[dict]) -> str:
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _yes_no_prompt(self, question: str) -> str:
        """The rendered chat prompt of a yes/no question about one image, kept per question: a judge
        asks the same few checklist questions of every image."""
        prompt = self._yes_no_prompts.get(question)
        if prompt is None:
            if len(self._yes_no_prompts) >= 4096:
                self._yes_no_prompts.clear()
            prompt = self._render([{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": yes_no_text(question)}]}])
            self._yes_no_prompts[question] = prompt
        return prompt

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Model inputs for rendered chat prompts, right-padded (so a prefix is computed as if alone)."""
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True,
                                  "add_special_tokens": False}
        if images:
            kwargs["images"] = images
        self.tokenizer.padding_side = "right"
        inputs = dict(self.processor(**kwargs))
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def generate(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        json_schema: dict | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Completion:
        """Generate one answer; with ``json_schema`` decoding is constrained so the text is valid JSON."""
        max_tokens = max_tokens or self.max_new_tokens
        conversation, images = self._hf_messages(messages)
        inputs = self._encode([self._render(conversation)], images)
        prompt_len = inputs["input_ids"].shape[1]
        constraint = None
        if json_schema is not None:
            constraint = self._constraint(json_schema)
            constraint.check_budget(max_tokens)
        picker = _Picker(constraint, prompt_len, max_tokens, temperature, self.eos_ids)
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([picker]),
                eos_token_id=self.eos_ids or None,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
        ids = out.sequences[0, prompt_len:].tolist()
        finish = "length"
        if ids and ids[-1] in self.eos_ids:
            ids, finish = ids[:-1], "stop"
        if constraint is not None:
            text = "".join(self.texts[i] or "" for i in ids)
            check_json(text, json_schema)
        else:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        tokens = []
        if logprobs:
            for step, tid in enumerate(ids):
                logp = torch.log_softmax(out.logits[step][0].float(), dim=-1)
                top = torch.topk(logp, top_logprobs) if top_logprobs else None
                alts = [] if top is None else [(self._token_str(i), float(v))
                                               for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
                tokens.append(TokenLogprob(self._token_str(tid), float(logp[tid]), alts))
        return Completion(text, finish, Usage(prompt_len, len(out.sequences[0]) - prompt_len), tokens)

    def _constraint(self, schema: dict) -> TokenConstraint:
        """The token constraint of ``schema``, kept per schema so its transition cache serves every request."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._constraints:
            if len(self._constraints) >= 16:
                self._constraints.pop(next(iter(self._constraints)))
            self._constraints[key] = TokenConstraint(JsonGrammar(schema), self.texts, self.eos_ids)
        return self._constraints[key]

    def _token_str(self, token_id: int) -> str:
        text = self.texts[token_id] if token_id < len(self.texts) else None
        return text if text is not None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _yes_no_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._yes_no is None:
            groups: dict[str, list[int]] = {"yes": [], "no": []}
            for i, text in enumerate(self.texts):
                group = yes_no_group(text) if text else None
                if group:
                    groups[group].append(i)
            if not groups["yes"] or not groups["no"]:
                raise UserError(f"the tokenizer of {self.model_id!r} has no single token for 'yes' or 'no'")
            self._yes_no = (torch.tensor(groups["yes"], device=self.device),
                            torch.tensor(groups["no"], device=self.device))
        return self._yes_no

    def next_token_logprobs(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        """Log-probabilities of the token after the yes/no prompt, shape [B, V]; differentiable (training)."""
        if not self.multimodal:
            raise UserError(f"judge model {self.model_id!r} is text-only; P(yes) about images needs a VLM")
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        inputs = self._encode([self._yes_no_prompt(q) for q in questions], [img.convert("RGB") for img in images])
        logits = self.model(**inputs).logits  # [B, L, V]
        last = inputs["attention_mask"].sum(dim=1) - 1  # right padding: last real position per row
        return torch.log_softmax(logits[torch.arange(len(questions), device=self.device), last].float(), dim=-1)

    def yes_no_log_odds(self, images: list[Image.Image], questions: list[str]) -> torch.Tensor:
        """log mass(yes variants) - log mass(no variants) of the next token, shape [B]; differentiable."""
        logp = self.next_token_logprobs(images, questions)
        yes, no = self._yes_no_ids()
        return torch.logsumexp(logp[:, yes], dim=-1) - torch.logsumexp(logp[:, no], dim=-1)

    def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        """P(yes) per pair, in micro-batches of ``batch_size``."""
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(questions), self.batch_size):
                log_odds = self.yes_no_log_odds(images[i:i + self.batch_size], questions[i:i + self.batch_size])
                out += torch.sigmoid(log_odds).tolist()
        return out


def _torch_dtype(name: str, device: torch.device) -> torch.dtype | str:
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32  # half precision is slow on CPU
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise UserError(f"unknown judges.engine.dtype {name!r}; known: auto, {', '.join(choices)}")
    return choices[name]


# ---------------------------------------------------------------- OpenAI-compatible servers
class OpenAIEngine(LLMEngine):
    """Any OpenAI-compatible /v1/chat/completions server, through the official ``openai`` client."""

    def __init__(self, model: str, *, base_url: str | None, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, max_new_tokens: int = 256,
                 top_logprobs: int = MAX_TOP_LOGPROBS, concurrency: int = 8) -> None:
        import openai  # a runtime dependency; imported here to keep start-up light
        if not base_url:
            raise UserError("judges.engine.kind=openai needs judges.engine.base_url, e.g. http://127.0.0.1:8000/v1")
        self._openai = openai
        self.model_id = model
        self.base_url = base_url
        self.max_new_tokens = max_new_tokens
        self.top_logprobs = top_logprobs
        self.concurrency = concurrency
        # Local servers (vLLM, the judges) need no key; the client insists on a non-empty one.
        api_key = os.environ.get(api_key_env) or "EMPTY"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self.api_key_env = api_key_env

    @classmethod
    def from_config(cls, cfg: EngineConfig | DictConfig) -> OpenAIEngine:
        """Engine from ``judges.engine``."""
        return cls(cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                   max_retries=cfg.max_retries, max_new_tokens=cfg.max_new_tokens,
                   top_logprobs=cfg.top_logprobs, concurrency=cfg.concurrency)

    def _post(self, body: dict) -> Completion:
        openai = self._openai
        try:
            response = self.client.chat.completions.create(**body)
        except openai.AuthenticationError as exc:
            raise UserError(f"{self.base_url} refused the API key from ${self.api_key_env}: {exc.message}") from exc
        except openai.NotFoundError as exc:
            raise UserError(f"{self.base_url} does not serve model {self.model_id!r}: {exc.message}") from exc
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise UserError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} after {self.client.max_retries} "
                f"retries ({exc}); start it or fix judges.engine.base_url / timeout_s"
            ) from exc
        except openai.APIStatusError as exc:
            raise EngineError(f"{self.base_url} answered HTTP {exc.status_code}: {exc.message}") from exc
        return parse_chat_response(response.model_dump())

    def generate(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        json_schema: dict | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Completion:
        """One chat completion; JSON output is requested with ``response_format`` and validated here."""
        body = chat_request(self.model_id, check_messages(messages), max_tokens=max_tokens or self.max_new_tokens,
                            temperature=temperature, json_schema=json_schema, logprobs=logprobs,
                            top_logprobs=top_logprobs)
        completion = self._post(body)
        if json_schema is not None:
            check_json(completion.text, json_schema)
        return completion

    def _p_yes_one(self, image: Image.Image, question: str) -> float:
        completion = self.generate(yes_no_messages(image, question), max_tokens=1, temperature=0.0,
                                   logprobs=True, top_logprobs=self.top_logprobs)
        if not completion.tokens:
            raise EngineError(f"{self.base_url} returned no logprobs; it must support logprobs/top_logprobs")
        return p_yes_from_top_logprobs(completion.tokens[0].top_logprobs)

    def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        """P(yes) per pair; one max_tokens=1 request each, ``concurrency`` in flight."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._p_yes_one, images, questions))


# ---------------------------------------------------------------- in-process vLLM
def vllm_tokens(output: Any) -> list[TokenLogprob]:
    """TokenLogprobs from a vLLM ``CompletionOutput`` (``token_ids`` + ``logprobs``: [{id: Logprob}])."""
    tokens = []
    for tid, alternatives in zip(output.token_ids, output.logprobs or [], strict=False):
        ranked = sorted(alternatives.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        top = [(lp.decoded_token, float(lp.logprob)) for _, lp in ranked]
        chosen = alternatives[tid]
        tokens.append(TokenLogprob(chosen.decoded_token, float(chosen.logprob), top))
    return tokens


class VLLMEngine(LLMEngine):
    """In-process ``vllm.LLM`` (GPU); a thin layer over the wire helpers shared with :class:`OpenAIEngine`."""

    def __init__(self, model: str, *, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 max_model_len: int = 4096, max_new_tokens: int = 256,
                 top_logprobs: int = MAX_TOP_LOGPROBS) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise UserError(
                "judges.engine.kind=vllm needs vLLM: pip install 'craft_ray[vllm]' on a machine with a GPU, "
                "or use judges.engine.kind=transformers (CPU/GPU) or kind=openai (a served model)"
            ) from exc
        self._vllm = vllm
        self.model_id = model
        self.max_new_tokens = max_new_tokens
        self.top_logprobs = top_logprobs
        self.llm = vllm.LLM(model=model, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, max_logprobs=top_logprobs)

    @classmethod
    def from_config(cls, cfg: EngineConfig | DictConfig) -> VLLMEngine:
        """Engine from ``judges.engine``."""
        return cls(cfg.model, dtype=cfg.dtype, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   max_model_len=cfg.max_model_len, max_new_tokens=cfg.max_new_tokens,
                   top_logprobs=cfg.top_logprobs)

    def _params(self, max_tokens: int, temperature: float, json_schema: dict | None, top_logprobs: int) -> Any:
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                                  "logprobs": top_logprobs or None}
        if json_schema is not None:
            try:  # vLLM >= 0.10.2; guided_decoding was removed in 0.12
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                kwargs["guided_decoding"] = GuidedDecodingParams(json=json_schema)
        return self._vllm.SamplingParams(**kwargs)

    def generate(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        json_schema: dict | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> Completion:
        """One chat completion via ``LLM.chat``; JSON through structured outputs, validated here."""
        params = self._params(max_tokens or self.max_new_tokens, temperature, json_schema,
                              top_logprobs if logprobs else 0)
        result = self.llm.chat(check_messages(messages), params, use_tqdm=False)[0]
        out = result.outputs[0]
        completion = Completion(out.text, "length" if out.finish_reason == "length" else "stop",
                                Usage(len(result.prompt_token_ids), len(out.token_ids)),
                                vllm_tokens(out) if logprobs else [])
        if json_schema is not None:
            check_json(completion.text, json_schema)
        return completion

    def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        """P(yes) per pair; all pairs in one ``LLM.chat`` batch with max_tokens=1."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        conversations = [yes_no_messages(img, q) for img, q in zip(images, questions, strict=True)]
        results = self.llm.chat(conversations, self._params(1, 0.0, None, self.top_logprobs), use_tqdm=False)
        first = [vllm_tokens(r.outputs[0])[:1] for r in results]
        if not all(first):
            raise EngineError(f"vLLM returned no logprobs for {self.model_id!r}; P(yes) needs them")
        return [p_yes_from_top_logprobs(tokens[0].top_logprobs) for tokens in first]


ENGINES: dict[str, type] = {"transformers": TransformersEngine, "openai": OpenAIEngine, "vllm": VLLMEngine}


def make_engine(cfg: EngineConfig | DictConfig) -> LLMEngine:
    """The engine named by ``cfg.kind`` (``judges.engine``)."""
    if cfg.kind not in ENGINES:
        raise UserError(f"unknown judges.engine.kind {cfg.kind!r}; known: {', '.join(ENGINES)}")
    return ENGINES[cfg.kind].from_config(cfg)
