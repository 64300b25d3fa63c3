"""The tiny judge: a Llava-style vision-language model small enough to ship and to run on CPU.

It is a real ``LlavaForConditionalGeneration`` (tiny CLIP vision tower + tiny Llama text model)
with a byte-level BPE tokenizer trained locally on checklist-style questions and JSON, a CLIP
image processor and a Llava-1.5-style chat template, saved with ``save_pretrained``. It loads
through the same ``AutoProcessor``/``AutoModelForImageTextToText`` path as a hub id such as
``llava-hf/llava-1.5-7b-hf``. Freshly built it is random; bootstrap trains it on phantom yes/no
questions with :func:`yes_no_loss`, which uses the very prompt and read-out of inference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from craft_ray.modalities import MODALITIES

if TYPE_CHECKING:
    from PIL import Image

    from craft_ray.models.engines import TransformersEngine

IMAGE_SIZE = 64  # pixels (square) the image processor resizes to
PATCH_SIZE = 8  # vision patch side in pixels -> (64/8)^2 = 64 image tokens
VOCAB_SIZE = 512  # BPE vocabulary: 256 bytes + merges + special tokens
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]

# Llava-1.5 layout ("USER: <image>\n... ASSISTANT:"); string or list-of-parts content.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'SYSTEM: ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _corpus() -> list[str]:
    """Checklist-style questions with yes/no answers, prompts and JSON snippets from the modality registry."""
    lines = []
    for mod in MODALITIES.values():
        for labels in mod.datasets.values():
            for lab in labels:
                lines += [template.format(label=lab.display) for template in mod.templates]
                for q in (f"Does the image show {lab.display}?", f"Is there {lab.display} in this {mod.caption}?",
                          f"Is this {mod.description} consistent with {lab.display}?"):
                    for answer in ("yes", "no", "Yes", "No"):
                        lines.append(f"USER: <image>\n{q} Answer yes or no. ASSISTANT: {answer}")
                        lines.append(answer)  # the bare word too, so "yes" is one token with and without a space
                lines.append('{"prompts": ["' + mod.templates[0].format(label=lab.display) + '"]}')
        lines.append(f"Is the {mod.anatomy} visible? Is the image {mod.description}?")
    lines += [
        '{"items": [{"id": "q1", "question": "Is the heart enlarged?", "present": "an enlarged heart", '
        '"absent": "a normal heart", "parent": null}]}',
        "Is the border irregular? Are there at least three colours? Is the lesion round and uniform?",
        "Is the cup-to-disc ratio large? Are there dark red dots and yellow exudate spots?",
        "Are the nuclei large and dense? Are there white gland lumens? Are there wavy pink fibres?",
        "Is there a bright opacity in the lowest part of a lung field? Is the heart silhouette wide?",
    ]
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained on the judge corpus; has single tokens for yes/no and every byte."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    for word in ("yes", " yes", "no", " no"):
        if len(fast.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny judge tokenizer splits {word!r}; the corpus must contain it more often")
    return fast


def _text_config(tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def _save_generation_config(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_judge(out_dir: str | Path, *, seed: int = 0, vision_hidden: int = 32, vision_layers: int = 2,
                    text_hidden: int = 64, text_layers: int = 2) -> Path:
    """Build and save a random tiny Llava-style judge (model, processor, chat template) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=vision_hidden,
        ),
        text_config=_text_config(tokenizer, text_hidden, text_layers),
        image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    _save_generation_config(model, tokenizer)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_tiny_text_lm(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a random tiny text-only Llama LM with the judge tokenizer and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(_text_config(tokenizer))
    _save_generation_config(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def answer_token_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """Ids of the answers " yes" and " no" as they follow the chat template's "ASSISTANT:"."""
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in (" yes", " no")]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the tokenizer splits ' yes' or ' no'; build it with build_tokenizer()")
    return ids[0][0], ids[1][0]


def yes_no_loss(
    engine: TransformersEngine, images: list[Image.Image], questions: list[str], answers: list[bool]
) -> torch.Tensor:
    """Next-token cross-entropy of the answer (" yes"/" no") after the engine's yes/no prompt (scalar).

    Training the full next-token distribution (not only the restricted yes/no odds) makes the
    judge put its mass on yes/no, as a real instruction-tuned VLM does, so served engines that
    only see the top-k alternatives read the same P(yes).
    """
    logp = engine.next_token_logprobs(images, questions)
    yes_id, no_id = answer_token_ids(engine.tokenizer)
    target = torch.tensor([yes_id if a else no_id for a in answers], device=logp.device)
    return torch.nn.functional.nll_loss(logp, target)


def fit_yes_no(
    engine: TransformersEngine,
    images: list[Image.Image],
    questions: list[str],
    answers: list[bool],
    *,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """Train ``engine.model`` in place with AdamW on shuffled mini-batches; returns the loss per step."""
    if not len(images) == len(questions) == len(answers):
        raise ValueError(f"{len(images)} images, {len(questions)} questions, {len(answers)} answers")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(engine.model.parameters(), lr=lr)
    # Linear warm-up, then cosine decay to zero: a constant rate plateaus early on this tiny model.
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    engine.model.train()
    losses = []
    for _ in tqdm(range(steps), desc="train judge", disable=steps < 50, mininterval=5):
        idx = torch.randperm(len(images), generator=gen)[:batch_size].tolist()
        loss = yes_no_loss(engine, [images[i] for i in idx], [questions[i] for i in idx], [answers[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(engine.model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    engine.model.eval()
    return losses
