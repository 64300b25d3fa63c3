"""The ``transformers`` judges engine: an in-process HF model (text LM or vision-language model), CPU or
GPU, behind :class:`craft_ray.models.engines.LLMEngine`; JSON output is guaranteed by
:mod:`craft_ray.models.json_constrained`. Apart from :mod:`craft_ray.models.engines` so that the engines
that need neither torch nor transformers (``openai``, ``vllm``), the judges' ingress and the training
driver import without them."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from craft_ray.errors import UserError
from craft_ray.models.engines import (
    Completion,
    LLMEngine,
    Message,
    TokenLogprob,
    Usage,
    check_json,
    check_messages,
    decode_data_url,
    yes_no_group,
    yes_no_text,
)
from craft_ray.models.json_constrained import JsonGrammar, TokenConstraint

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from craft_ray.config import EngineConfig


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


