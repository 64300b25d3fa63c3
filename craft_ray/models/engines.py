"""LLM engines for the judges: chat generation (optionally JSON-schema constrained) and batched P(yes).

Three implementations behind one interface (:class:`LLMEngine`), chosen by ``judges.engine.kind``:

- ``transformers``: an in-process HF model (text LM or vision-language model), CPU or GPU; JSON
  output is guaranteed by :mod:`craft_ray.models.json_constrained`. It lives in
  :mod:`craft_ray.models.engines_hf`, so that this module imports without torch and transformers.
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

from PIL import Image

from craft_ray.errors import UserError

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


def __getattr__(name: str) -> Any:
    """``TransformersEngine`` lives in :mod:`craft_ray.models.engines_hf` (torch, transformers): imported
    on first use, so that this module, the judges' ingress and the training driver stay without them."""
    if name == "TransformersEngine":
        from craft_ray.models.engines_hf import TransformersEngine

        return TransformersEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ENGINES: tuple[str, ...] = ("transformers", "openai", "vllm")


def make_engine(cfg: EngineConfig | DictConfig) -> LLMEngine:
    """The engine named by ``cfg.kind`` (``judges.engine``)."""
    if cfg.kind not in ENGINES:
        raise UserError(f"unknown judges.engine.kind {cfg.kind!r}; known: {', '.join(ENGINES)}")
    if cfg.kind == "transformers":
        from craft_ray.models.engines_hf import TransformersEngine

        return TransformersEngine.from_config(cfg)
    return (OpenAIEngine if cfg.kind == "openai" else VLLMEngine).from_config(cfg)
