"""JSON-schema-constrained decoding: a character-level grammar for a subset of JSON Schema, lifted to tokens.

The grammar accepts exactly the compact JSON documents valid under the schema (one optional space
after ``:``, ``,`` and before the root value). Supported: ``object`` (``properties`` emitted in
declaration order, optional ones may be skipped, ``required``), ``array`` (``items``, ``minItems``,
``maxItems``), ``string`` (``minLength``, ``maxLength``), ``integer``, ``number`` (no exponent),
``boolean``, ``null``, ``enum``/``const``, ``anyOf``/``oneOf``/type lists whose alternatives start
with different characters (e.g. ``string | null``), and local ``$ref`` into ``$defs``. Anything else
(``pattern``, ``format``, ``minimum``, recursion, ...) is refused with a message, never ignored.

:class:`TokenConstraint` picks tokens so that the output stays a valid prefix *and* can still be
completed within the token budget, which makes every generation end in a schema-valid document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from craft_ray.errors import UserError

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions",
     "additionalProperties", "readOnly", "writeOnly", "deprecated"}
)
_KEYWORDS = {
    "string": {"minLength", "maxLength"},
    "integer": set(),
    "number": set(),
    "boolean": set(),
    "null": set(),
    "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required"},
}
_FILLER = "a"  # the character used to pad strings up to minLength when completing a document
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrt'


# Compiled schema nodes; identity-hashed so they can key caches and sit inside parser states.
@dataclass(frozen=True, eq=False)
class _Str:
    min_len: int
    max_len: int | None


@dataclass(frozen=True, eq=False)
class _Num:
    integer: bool


@dataclass(frozen=True, eq=False)
class _Lit:
    options: tuple[str, ...]  # JSON texts, e.g. '"cxr"', 'true', 'null'


@dataclass(frozen=True, eq=False)
class _Arr:
    items: Any
    min_items: int
    max_items: int | None


@dataclass(frozen=True, eq=False)
class _Obj:
    props: tuple[tuple[str, Any, bool], ...]  # (key as JSON text with quotes, value node, required)


@dataclass(frozen=True, eq=False)
class _Union:
    alts: tuple[Any, ...]


def _first_chars(node: Any) -> frozenset[str]:
    if isinstance(node, _Str):
        return frozenset('"')
    if isinstance(node, _Num):
        return frozenset("-" + _DIGITS)
    if isinstance(node, _Lit):
        return frozenset(o[0] for o in node.options)
    if isinstance(node, _Arr):
        return frozenset("[")
    if isinstance(node, _Obj):
        return frozenset("{")
    return frozenset().union(*(_first_chars(a) for a in node.alts))


class _Compiler:
    def __init__(self, root: dict) -> None:
        self.root = root
        self.refs: dict[str, Any] = {}
        self.resolving: set[str] = set()

    def ref(self, ref: str, path: str) -> Any:
        if ref in self.refs:
            return self.refs[ref]
        if ref in self.resolving:
            raise UserError(f"JSON schema at {path}: recursive $ref {ref!r} is not supported by constrained decoding")
        if not ref.startswith("#/") and ref != "#":
            raise UserError(f"JSON schema at {path}: only local $ref like '#/$defs/Name' is supported, got {ref!r}")
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise UserError(f"JSON schema at {path}: $ref {ref!r} points nowhere")
            target = target[part]
        self.resolving.add(ref)
        node = self.node(target, ref)
        self.resolving.discard(ref)
        self.refs[ref] = node
        return node

    def node(self, s: Any, path: str) -> Any:
        if not isinstance(s, dict):
            raise UserError(f"JSON schema at {path} must be an object, got {s!r}")
        keys = set(s) - _ANNOTATIONS
        if "$ref" in keys:
            self._only(keys, {"$ref"}, path)
            return self.ref(s["$ref"], path)
        if "enum" in keys or "const" in keys:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not values:
                raise UserError(f"JSON schema at {path}: empty enum")
            return _Lit(tuple(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values))
        for word in ("anyOf", "oneOf"):
            if word in keys:
                self._only(keys, {word}, path)
                return self._union([self.node(a, f"{path}/{word}/{i}") for i, a in enumerate(s[word])], path)
        kind = s.get("type")
        if isinstance(kind, list):
            return self._union([self.node({**s, "type": k}, f"{path}[{k}]") for k in kind], path)
        if kind not in _KEYWORDS:
            raise UserError(
                f"JSON schema at {path}: type {kind!r} is not supported by constrained decoding; "
                f"use one of {', '.join(_KEYWORDS)} (or enum/const/anyOf/$ref)"
            )
        self._only(keys, _KEYWORDS[kind] | {"type"}, path)
        if kind == "string":
            return _Str(int(s.get("minLength", 0)), s.get("maxLength"))
        if kind in ("integer", "number"):
            return _Num(kind == "integer")
        if kind == "boolean":
            return _Lit(("true", "false"))
        if kind == "null":
            return _Lit(("null",))
        if kind == "array":
            if "items" not in s:
                raise UserError(f"JSON schema at {path}: an array needs 'items' for constrained decoding")
            lo, hi = int(s.get("minItems", 0)), s.get("maxItems")
            if hi is not None and hi < lo:
                raise UserError(f"JSON schema at {path}: maxItems {hi} < minItems {lo}")
            return _Arr(self.node(s["items"], f"{path}/items"), lo, hi)
        props = s.get("properties", {})
        required = list(s.get("required", []))
        unknown = [r for r in required if r not in props]
        if unknown:
            raise UserError(f"JSON schema at {path}: required {unknown} not among properties {list(props)}")
        return _Obj(tuple(
            (json.dumps(name, ensure_ascii=False), self.node(sub, f"{path}/properties/{name}"), name in required)
            for name, sub in props.items()
        ))

    @staticmethod
    def _only(keys: set[str], allowed: set[str], path: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise UserError(
                f"JSON schema at {path}: keyword(s) {extra} not supported by constrained decoding; "
                f"allowed here: {sorted(allowed)}"
            )

    @staticmethod
    def _union(alts: list[Any], path: str) -> Any:
        seen: set[str] = set()
        for alt in alts:
            first = _first_chars(alt)
            if first & seen:
                raise UserError(
                    f"JSON schema at {path}: anyOf/oneOf alternatives must start with different characters "
                    "(e.g. string | null); these overlap"
                )
            seen |= first
        return alts[0] if len(alts) == 1 else _Union(tuple(alts))


def compile_schema(schema: dict) -> Any:
    """Compile a JSON schema into grammar nodes, refusing any keyword the grammar cannot enforce."""
    compiler = _Compiler(schema)
    compiler.resolving.add("#")  # a $ref to the root from inside it is recursion
    return compiler.node(schema, "#")


# ---------------------------------------------------------------- character-level parser
# A state is a tuple of frames (a stack); each frame is a tuple (kind, node, phase, ...).
# Feeding a character returns the new state or None. Frames of numbers and literals can finish
# without consuming a character: they then hand that character to their parent ("reject").
_DONE, _REJECT = "done", "reject"


def _start(node: Any, c: str) -> tuple | None:
    """Frame for a value of ``node`` whose first character is ``c``; None if it cannot start so."""
    if isinstance(node, _Union):
        for alt in node.alts:
            if c in _first_chars(alt):
                return _start(alt, c)
        return None
    if isinstance(node, _Str):
        return ("str", node, 0, 0) if c == '"' else None
    if isinstance(node, _Num):
        if c == "-":
            return ("num", node, "sign")
        if c == "0":
            return ("num", node, "zero")
        return ("num", node, "int") if c in _DIGITS else None
    if isinstance(node, _Lit):
        return ("lit", node, c) if any(o.startswith(c) for o in node.options) else None
    if isinstance(node, _Arr):
        return ("arr", node, "first", 0) if c == "[" else None
    return ("obj", node, "first", 0, "") if c == "{" else None


def _candidates(node: _Obj, idx: int) -> list[int]:
    """Property indices that may come next: optional ones up to and including the next required one."""
    out = []
    for j in range(idx, len(node.props)):
        out.append(j)
        if node.props[j][2]:
            break
    return out


def _step(frame: tuple, c: str) -> Any:
    """One character into one frame: new frame(s) tuple, _DONE, _REJECT or None."""
    kind, node = frame[0], frame[1]
    if kind == "str":
        n, esc = frame[2], frame[3]
        if esc == 1:
            if c == "u":
                return (("str", node, n, 2),)
            return (("str", node, n + 1, 0),) if c in _ESCAPES else None
        if esc >= 2:
            if c not in _HEX:
                return None
            return (("str", node, n + 1, 0),) if esc == 5 else (("str", node, n, esc + 1),)
        if c == '"':
            return _DONE if n >= node.min_len else None
        if node.max_len is not None and n >= node.max_len:
            return None
        if c == "\\":
            return (("str", node, n, 1),)
        return None if ord(c) < 0x20 else (("str", node, n + 1, 0),)
    if kind == "num":
        phase = frame[2]
        if phase in ("sign", "dot"):
            if c not in _DIGITS:
                return None
            if phase == "dot":
                return (("num", node, "frac"),)
            return (("num", node, "zero" if c == "0" else "int"),)
        if c in _DIGITS and phase in ("int", "frac"):
            return (frame,)
        if c == "." and phase in ("zero", "int") and not node.integer:
            return (("num", node, "dot"),)
        return _REJECT
    if kind == "lit":
        prefix = frame[2] + c
        if any(o.startswith(prefix) for o in node.options):
            return (("lit", node, prefix),)
        return _REJECT if frame[2] in node.options else None
    if kind == "arr":
        phase, count = frame[2], frame[3]
        if phase in ("first", "comma", "comma_ws"):
            if phase == "first" and c == "]":
                return _DONE if node.min_items == 0 else None
            if phase == "comma" and c == " ":
                return (("arr", node, "comma_ws", count),)
            if node.max_items == 0:
                return None
            child = _start(node.items, c)
            return None if child is None else (("arr", node, "value", count), child)
        if phase == "after":
            if c == "]":
                return _DONE if count >= node.min_items else None
            if c == "," and (node.max_items is None or count < node.max_items):
                return (("arr", node, "comma", count),)
        return None
    if kind == "obj":
        phase, idx, key = frame[2], frame[3], frame[4]
        if phase in ("first", "comma", "comma_ws"):
            if phase == "first" and c == "}":
                return _DONE if not any(p[2] for p in node.props[idx:]) else None
            if phase == "comma" and c == " ":
                return (("obj", node, "comma_ws", idx, ""),)
            if c == '"' and idx < len(node.props):
                return (("obj", node, "key", idx, '"'),)
            return None
        if phase == "key":
            prefix = key + c
            matches = [j for j in _candidates(node, idx) if node.props[j][0].startswith(prefix)]
            if not matches:
                return None
            for j in matches:
                if node.props[j][0] == prefix:
                    return (("obj", node, "colon", j, ""),)
            return (("obj", node, "key", idx, prefix),)
        if phase == "colon":
            return (("obj", node, "after_colon", idx, ""),) if c == ":" else None
        if phase in ("after_colon", "after_colon_ws"):
            if phase == "after_colon" and c == " ":
                return (("obj", node, "after_colon_ws", idx, ""),)
            child = _start(node.props[idx][1], c)
            return None if child is None else (("obj", node, "value", idx, ""), child)
        if phase == "after":
            if c == "}":
                return _DONE if not any(p[2] for p in node.props[idx:]) else None
            if c == "," and idx < len(node.props):
                return (("obj", node, "comma", idx, ""),)
        return None
    # root
    phase = frame[2]
    if phase in ("start", "start_ws"):
        if phase == "start" and c == " ":
            return (("root", node, "start_ws"),)
        child = _start(node, c)
        return None if child is None else (("root", node, "value"), child)
    return None


def _child_done(frame: tuple) -> tuple:
    """The parent frame once its child value is finished."""
    kind, node = frame[0], frame[1]
    if kind == "arr":
        return ("arr", node, "after", frame[3] + 1)
    if kind == "obj":
        return ("obj", node, "after", frame[3] + 1, "")
    return ("root", node, "done")


def feed(state: tuple, text: str) -> tuple | None:
    """The parser state after ``text``, or None if ``text`` leaves the language."""
    for c in text:
        while True:
            if not state:
                return None
            res = _step(state[-1], c)
            if res is None:
                return None
            if res == _DONE:
                state = state[:-2] + (_child_done(state[-2]),)
                break
            if res == _REJECT:
                state = state[:-2] + (_child_done(state[-2]),)
                continue  # the finished number/literal hands the character to its parent
            state = state[:-1] + res
            break
    return state


def is_complete(state: tuple) -> bool:
    """True when the text fed so far is a whole schema-valid document."""
    while len(state) > 1 and _finish(state[-1]) == "" and state[-1][0] in ("num", "lit"):
        state = state[:-2] + (_child_done(state[-2]),)
    return len(state) == 1 and state[0][2] == "done"


@lru_cache(maxsize=4096)
def _min_value(node: Any) -> str:
    if isinstance(node, _Union):
        return min((_min_value(a) for a in node.alts), key=len)
    if isinstance(node, _Str):
        return '"' + _FILLER * node.min_len + '"'
    if isinstance(node, _Num):
        return "0"
    if isinstance(node, _Lit):
        return min(node.options, key=len)
    if isinstance(node, _Arr):
        return "[" + ",".join([_min_value(node.items)] * node.min_items) + "]"
    return "{" + _obj_rest(node, 0, comma=False)


def _obj_rest(node: _Obj, idx: int, comma: bool) -> str:
    parts = [key + ":" + _min_value(sub) for key, sub, req in node.props[idx:] if req]
    return ("," if comma and parts else "") + ",".join(parts) + "}"


def _obj_from_key(node: _Obj, idx: int, prefix: str) -> str:
    return min(
        (node.props[j][0][len(prefix):] + ":" + _min_value(node.props[j][1]) + _obj_rest(node, j + 1, True)
         for j in _candidates(node, idx) if node.props[j][0].startswith(prefix)),
        key=len,
    )


def _finish(frame: tuple) -> str:
    """Shortest text that finishes ``frame`` (closing it), given its phase."""
    kind, node = frame[0], frame[1]
    if kind == "str":
        n, esc = frame[2], frame[3]
        tail = "n" if esc == 1 else "0" * (6 - esc) if esc >= 2 else ""
        n += 1 if tail else 0
        return tail + _FILLER * max(0, node.min_len - n) + '"'
    if kind == "num":
        return "0" if frame[2] in ("sign", "dot") else ""
    if kind == "lit":
        return min((o for o in node.options if o.startswith(frame[2])), key=len)[len(frame[2]):]
    if kind == "arr":
        phase, count = frame[2], frame[3]
        item = _min_value(node.items)
        if phase == "first":
            return ",".join([item] * node.min_items) + "]"
        if phase == "after":
            return ("," + item) * max(0, node.min_items - count) + "]"
        return item + ("," + item) * max(0, node.min_items - count - 1) + "]"  # comma / comma_ws
    if kind == "obj":
        phase, idx = frame[2], frame[3]
        if phase == "first":
            return _obj_rest(node, 0, comma=False)
        if phase == "key":
            return _obj_from_key(node, idx, frame[4])
        if phase == "colon":
            return ":" + _min_value(node.props[idx][1]) + _obj_rest(node, idx + 1, True)
        if phase in ("after_colon", "after_colon_ws"):
            return _min_value(node.props[idx][1]) + _obj_rest(node, idx + 1, True)
        if phase == "after":
            return _obj_rest(node, idx, True)
        return _obj_from_key(node, idx, "")  # comma / comma_ws: a key must follow
    return _min_value(node) if frame[2] in ("start", "start_ws") else ""


def min_completion(state: tuple) -> str:
    """Shortest text that turns the current prefix into a complete valid document."""
    # Every frame below the top is mid-value; once its child closes it continues from _child_done.
    parts = [_finish(state[-1])] + [_finish(_child_done(frame)) for frame in reversed(state[:-1])]
    return "".join(parts)


class JsonGrammar:
    """The character-level language of one schema: initial state, feed, completeness, shortest completion."""

    def __init__(self, schema: dict) -> None:
        self.schema = schema
        self.root = compile_schema(schema)
        self.initial: tuple = (("root", self.root, "start"),)
        self._completion: dict[tuple, str] = {}

    def feed(self, state: tuple, text: str) -> tuple | None:
        """State after ``text`` or None when ``text`` cannot continue a valid document."""
        return feed(state, text)

    def is_complete(self, state: tuple) -> bool:
        """True when the text so far is a whole valid document."""
        return is_complete(state)

    def min_completion(self, state: tuple) -> str:
        """Shortest text that completes a valid document from ``state``."""
        if state not in self._completion:
            if len(self._completion) > 100_000:
                self._completion.clear()
            self._completion[state] = min_completion(state)
        return self._completion[state]

    def needed_chars(self) -> set[str]:
        """Characters a shortest completion can require (each needs a single-character token)."""
        chars = set('{}[],:"0n' + _FILLER + "truefalsenull")
        seen: set[int] = set()

        def walk(node: Any) -> None:
            if id(node) in seen:
                return
            seen.add(id(node))
            if isinstance(node, _Lit):
                chars.update("".join(node.options))
            elif isinstance(node, _Arr):
                walk(node.items)
            elif isinstance(node, _Obj):
                for key, sub, _ in node.props:
                    chars.update(key)
                    walk(sub)
            elif isinstance(node, _Union):
                for alt in node.alts:
                    walk(alt)

        walk(self.root)
        return chars


class TokenConstraint:
    """Token-level view of a :class:`JsonGrammar` over a tokenizer vocabulary, with a token budget.

    ``token_texts[i]`` is the text token ``i`` adds to the output (None for special tokens and
    fragments of multi-byte characters, which are never allowed). A token is allowed when the
    text stays a valid prefix and the shortest completion still fits in the remaining budget,
    counting one token per character (single-character tokens for those characters are checked
    to exist) and one token for end-of-sequence.
    """

    def __init__(self, grammar: JsonGrammar, token_texts: list[str | None], eos_ids: list[int]) -> None:
        self.grammar = grammar
        self.texts = token_texts
        self.eos_ids = list(eos_ids)
        singles = {t for t in token_texts if t is not None and len(t) == 1}
        missing = sorted(grammar.needed_chars() - singles)
        if missing:
            raise UserError(
                f"constrained JSON decoding needs single-character tokens for {missing}, which this tokenizer "
                "lacks; use a model whose tokenizer covers every byte or character (BPE with byte fallback)"
            )
        if not self.eos_ids:
            raise UserError("constrained JSON decoding needs an end-of-sequence token; the model defines none")
        self._next: dict[tuple[tuple, int], tuple | None] = {}

    def next_state(self, state: tuple, token_id: int) -> tuple | None:
        """Parser state after ``token_id`` or None if it breaks the grammar (cached)."""
        key = (state, token_id)
        if key not in self._next:
            if len(self._next) > 500_000:
                self._next.clear()
            text = self.texts[token_id] if 0 <= token_id < len(self.texts) else None
            self._next[key] = None if not text else self.grammar.feed(state, text)
        return self._next[key]

    def allowed(self, state: tuple, token_id: int, budget_after: int) -> bool:
        """Whether ``token_id`` may follow ``state`` leaving ``budget_after`` tokens (EOS included)."""
        if token_id in self.eos_ids:
            return self.grammar.is_complete(state)
        nxt = self.next_state(state, token_id)
        return nxt is not None and len(self.grammar.min_completion(nxt)) + 1 <= budget_after

    def check_budget(self, max_tokens: int) -> None:
        """Refuse a budget in which even the shortest valid document cannot be written."""
        need = len(self.grammar.min_completion(self.grammar.initial)) + 1
        if max_tokens < need:
            raise UserError(
                f"max_tokens={max_tokens} is too small for this JSON schema: the shortest valid output needs "
                f"{need} tokens (end-of-sequence included); raise judges.engine.max_new_tokens"
            )

    def pick(self, scores: torch.Tensor, state: tuple, budget: int, temperature: float,
             generator: torch.Generator | None = None) -> int:
        """Greedy (temperature 0) or sampled token among the allowed ones; ``scores`` is [V] logits."""
        budget_after = budget - 1
        vocab = min(scores.shape[-1], len(self.texts))
        scores = scores[:vocab].float().cpu()  # the per-token checks run in Python: one transfer, not many
        if temperature <= 0:
            for k in (64, vocab):
                for tid in torch.topk(scores, min(k, vocab)).indices.tolist():
                    if self.allowed(state, tid, budget_after):
                        return tid
            raise RuntimeError("constrained decoding found no allowed token; the grammar and budget disagree")
        probs = torch.softmax(scores / temperature, dim=-1)
        for _ in range(32):  # rejection sampling = sampling from the distribution restricted to allowed tokens
            if float(probs.sum()) <= 0:
                break
            tid = int(torch.multinomial(probs, 1, generator=generator))
            if self.allowed(state, tid, budget_after):
                return tid
            probs[tid] = 0.0
        mask = torch.tensor([self.allowed(state, t, budget_after) for t in range(vocab)])
        if not mask.any():
            raise RuntimeError("constrained decoding found no allowed token; the grammar and budget disagree")
        probs = torch.softmax(scores / temperature, dim=-1) * mask
        if float(probs.sum()) <= 0:  # every allowed token underflowed: fall back to the best allowed one
            return int(torch.where(mask, scores, torch.full_like(scores, -float("inf"))).argmax())
        return int(torch.multinomial(probs, 1, generator=generator))
