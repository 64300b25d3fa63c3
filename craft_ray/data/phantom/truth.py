"""Ground-truth yes/no answers to phantom checklist questions, from each image's generator metadata.

Every item of a phantom knowledge file carries a ``truth`` expression such as ``ctr > 0.5`` or
``"blue_grey" in colours and len(colours) >= 3`` over the image's metadata keys and ``label``. The
expressions are parsed with :mod:`ast` and interpreted node by node from a small whitelist (boolean
logic, comparisons, arithmetic, constants, names, ``len``); nothing is ever handed to ``eval``.
"""

from __future__ import annotations

import ast
import functools
import operator
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from craft_ray.errors import UserError

if TYPE_CHECKING:  # knowledge imports this module lazily; no import cycle at run time
    from craft_ray.knowledge import ChecklistItem, Knowledge

# Metadata keys each generator returns (tests check them against freshly generated images).
META_KEYS: dict[str, frozenset[str]] = {
    "cxr": frozenset(
        {"ctr", "heart_width_px", "thorax_width_px", "effusion_fraction", "effusion_side", "nodule_count",
         "nodule_radii"}
    ),
    "derm": frozenset(
        {"diameter_frac", "axis_ratio", "border_irregularity", "colour_count", "colours", "vessel_count"}
    ),
    "fundus": frozenset(
        {"cup_to_disc", "disc_radius_px", "disc_side", "vessel_count", "dot_count", "exudate_count"}
    ),
    "histo": frozenset({"nuclear_radius_px", "nuclear_density", "nucleus_count", "lumen_count"}),
}
LABEL_NAME = "label"  # the image's label, usable in expressions next to the metadata keys

_BOOL_OPS = {ast.And: all, ast.Or: any}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ARITH: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.Not: operator.not_, ast.USub: operator.neg}
_CONSTANT_TYPES = (bool, int, float, str)
_ALLOWED = "and/or/not, comparisons (< <= > >= == != in, not in), + - * /, numbers, strings, names, len(x)"


class TruthError(UserError):
    """A truth expression that is not in the allowed language, or names an unknown key."""


def _describe(node: ast.AST) -> str:
    return f"{type(node).__name__} '{ast.unparse(node)}'"


def _check(node: ast.AST, names: Collection[str] | None) -> None:
    """Raise TruthError at the first node outside the whitelist (or a name outside ``names``)."""
    if isinstance(node, ast.BoolOp) and type(node.op) in _BOOL_OPS:
        children: list[ast.AST] = list(node.values)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        children = [node.operand]
    elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        children = [node.left, *node.comparators]
    elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        children = [node.left, node.right]
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, _CONSTANT_TYPES):
            raise TruthError(f"constant {node.value!r} is not allowed; use numbers, strings, True or False")
        return
    elif isinstance(node, ast.Name):
        if names is not None and node.id not in names:
            raise TruthError(f"unknown name {node.id!r}; known: {', '.join(sorted(names))}")
        return
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "len"):
            raise TruthError(f"call {ast.unparse(node)!r} is not allowed; the only function is len(x)")
        if len(node.args) != 1 or node.keywords:
            raise TruthError(f"{ast.unparse(node)!r}: len takes exactly one argument")
        children = list(node.args)
    else:
        raise TruthError(f"{_describe(node)} is not allowed; allowed: {_ALLOWED}")
    for child in children:
        _check(child, names)


def parse(expression: str, names: Collection[str] | None = None) -> ast.Expression:
    """Parse and whitelist-check a truth expression; ``names`` (if given) are the allowed variable names."""
    if not isinstance(expression, str) or not expression.strip():
        raise TruthError(f"truth must be a non-empty expression string, got {expression!r}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise TruthError(f"invalid expression {expression!r}: {exc.msg}") from exc
    _check(tree.body, names)
    return tree


def names_for(modality: str) -> frozenset[str]:
    """Variable names a truth expression of ``modality`` may use: its metadata keys and ``label``."""
    return META_KEYS[modality] | {LABEL_NAME}


def _value(node: ast.AST, env: Mapping[str, Any]) -> Any:
    """Interpret one whitelisted node (``parse`` has already rejected everything else)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise TruthError(f"unknown metadata key {node.id!r}; known: {', '.join(sorted(env))}")
        return env[node.id]
    if isinstance(node, ast.BoolOp):
        # Lazy like Python's and/or, so that a guard such as `nodule_count > 0 and ...` protects the rest.
        values = (bool(_value(v, env)) for v in node.values)
        return _BOOL_OPS[type(node.op)](values)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_value(node.operand, env))
    if isinstance(node, ast.BinOp):
        return _ARITH[type(node.op)](_value(node.left, env), _value(node.right, env))
    if isinstance(node, ast.Call):
        return len(_value(node.args[0], env))
    assert isinstance(node, ast.Compare)
    left = _value(node.left, env)
    for op, right_node in zip(node.ops, node.comparators, strict=True):
        right = _value(right_node, env)
        if not _COMPARE[type(op)](left, right):
            return False
        left = right
    return True


@functools.lru_cache(maxsize=1024)
def _parsed(expression: str) -> ast.Expression:
    return parse(expression)  # cached: the same few expressions are asked of every image


def evaluate(expression: str, env: Mapping[str, Any]) -> bool:
    """Truth value of ``expression`` with variables from ``env`` (metadata keys and ``label``)."""
    tree = _parsed(expression)
    try:
        return bool(_value(tree.body, env))
    except TruthError:
        raise
    except (TypeError, ZeroDivisionError) as exc:
        raise TruthError(f"cannot evaluate {expression!r} on this metadata: {exc}") from exc


def item_truth(item: ChecklistItem, label: str, meta: Mapping[str, Any]) -> bool:
    """Ground-truth answer of ``item`` for an image of ``label`` with generator metadata ``meta``."""
    if item.truth is None:
        raise TruthError(f"checklist item {item.id!r} has no truth expression; add `truth:` to the knowledge file")
    if LABEL_NAME in meta:
        raise TruthError(f"metadata must not contain the reserved key {LABEL_NAME!r}; rename it")
    try:
        return evaluate(item.truth, {**meta, LABEL_NAME: label})
    except TruthError as exc:
        raise TruthError(f"item {item.id!r} ({item.truth}): {exc}") from exc


def answers(knowledge: Knowledge, label_of_image: str, meta: Mapping[str, Any]) -> dict[tuple[str, str], bool]:
    """Answers to every item of every label of ``knowledge`` for one image: ``(label, item id) -> yes``.

    An image of label A is asked the questions of label B too: those are what yield "no" answers.
    """
    if label_of_image not in knowledge.labels():
        raise TruthError(
            f"unknown label {label_of_image!r} in knowledge {knowledge.version}; known: "
            f"{', '.join(knowledge.labels())}"
        )
    out: dict[tuple[str, str], bool] = {}
    for label in knowledge.labels():
        for item in knowledge.checklist(label):
            try:
                out[(label, item.id)] = item_truth(item, label_of_image, meta)
            except TruthError as exc:
                raise TruthError(f"knowledge {knowledge.version}, label {label}: {exc}") from exc
    return out
