"""Evaluation reports: one Markdown file, one self-contained HTML file and the PNG figures behind both.

``python -m craft_ray.evaluate`` computes the numbers (CAS under each evaluator, tail thresholds,
tables with confidence intervals, judge audits, memorization pairs) and hands them to
:func:`write_report`, which only draws and lays them out. Figures are drawn on bare
:class:`matplotlib.figure.Figure` objects (PNG through the Agg renderer) so no display and no global
pyplot state are involved. The HTML embeds every figure as a ``data:`` URI and carries its own CSS,
so the file can be mailed or attached to an MLflow run and still open offline.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

DPI = 100
MAX_MEMORIZATION_PAIRS = 8
HIST_BINS = np.linspace(0.0, 1.0, 26)  # CAS lives in [0, 1]; shared bins make arms comparable
_SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


@dataclass
class Arm:
    """One image set shown in a report."""

    name: str  # "real", "base", "sft", "craft", "lora:...", ...
    labels: list[str]  # per-image label names [N]
    cas: dict[str, np.ndarray]  # evaluator ("train" | "ood") -> per-image CAS [N]
    grid: np.ndarray | None = None  # uint8 sample grid [H,W,3] (already tiled) or None
    audit: dict[str, dict[str, float]] | None = None  # label -> {checklist item id -> pass rate in [0,1]}; None = no judge
    memorization_pairs: list[tuple[np.ndarray, np.ndarray, float]] | None = None  # (generated, nearest real, cosine)


@dataclass(frozen=True)
class _Figure:
    """A figure written to disk: file stem (also the HTML id suffix), caption and path."""

    name: str
    caption: str
    path: Path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def write_report(folder: Path, *, title: str, arms: Sequence[Arm], taus: Mapping[str, float],
                 tables: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write report.md, report.html and figures/*.png into folder; return {"md": ..., "html": ..., "figures": folder/"figures"}."""
    if not arms:
        raise ValueError("write_report needs at least one arm; pass the evaluated image sets")
    names = [arm.name for arm in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate arm names {duplicates}; give every arm a unique name")
    for arm in arms:
        _check_arm(arm)

    folder = Path(folder)
    fig_dir = folder / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    slugs = _slugs(names)
    # One colour per arm across every figure, so "craft" is the same colour in each plot.
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}

    figures: list[_Figure] = []
    for evaluator, tau in taus.items():
        fig = _cas_histogram(fig_dir, arms, evaluator, float(tau), colors)
        if fig is not None:
            figures.append(fig)
    per_label = _per_label(fig_dir, arms, taus.get("train"), colors)
    if per_label is not None:
        figures.append(per_label)
    for arm in arms:
        slug = slugs[arm.name]
        for draw in (_samples, _memorization, _audit):
            fig = draw(fig_dir, arm, slug)
            if fig is not None:
                figures.append(fig)

    md_path = folder / "report.md"
    html_path = folder / "report.html"
    md_path.write_text(markdown_document(title, notes, tables, figures), encoding="utf-8")
    html_path.write_text(html_document(title, notes, tables, figures), encoding="utf-8")
    return {"md": md_path, "html": html_path, "figures": fig_dir}


def _check_arm(arm: Arm) -> None:
    """Reject arrays whose length or layout does not match the arm's labels."""
    n = len(arm.labels)
    for evaluator, values in arm.cas.items():
        if np.asarray(values).shape != (n,):
            raise ValueError(f"arm {arm.name!r}: CAS under {evaluator!r} has shape {np.asarray(values).shape}, "
                             f"expected ({n},) to match its {n} labels")
    if arm.grid is not None:
        _check_image(arm.grid, f"arm {arm.name!r}: grid")
    for i, (generated, real, _) in enumerate(arm.memorization_pairs or []):
        _check_image(generated, f"arm {arm.name!r}: memorization pair {i} generated image")
        _check_image(real, f"arm {arm.name!r}: memorization pair {i} real image")


def _check_image(image: np.ndarray, what: str) -> None:
    """Images are uint8 [H,W,3]; anything else is a caller bug worth naming."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} is {image.dtype} {image.shape}; expected uint8 [H,W,3] "
                         "(convert with (x * 255).round().clip(0, 255).astype(np.uint8))")


def _slugs(names: Sequence[str]) -> dict[str, str]:
    """File-safe, unique stems for arm names ("lora:r8" -> "lora_r8")."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "arm"
        slug, k = base, 2
        while slug in used:
            slug, k = f"{base}_{k}", k + 1
        used.add(slug)
        out[name] = slug
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _finite(values: np.ndarray) -> np.ndarray:
    """CAS values with NaN/inf dropped [M<=N]."""
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def _tail_percent(values: np.ndarray, tau: float) -> float:
    """Share of finite CAS values below tau, in percent (NaN when there are none)."""
    finite = _finite(values)
    return float(np.mean(finite < tau) * 100.0) if finite.size else float("nan")


def _cas_histogram(fig_dir: Path, arms: Sequence[Arm], evaluator: str, tau: float,
                   colors: Mapping[str, str]) -> _Figure | None:
    """Overlaid CAS histograms of every arm scored by this evaluator; None when no arm was."""
    scored = [arm for arm in arms if evaluator in arm.cas]
    if not scored:
        return None
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    for arm in scored:
        values = _finite(arm.cas[evaluator])
        label = f"{arm.name} (n={values.size}, tail {_tail_percent(values, tau):.1f}%)"
        # density: arms may hold different image counts (real test set vs. generated)
        ax.hist(values, bins=HIST_BINS, histtype="step", linewidth=1.8, density=values.size > 0, label=label,
                color=colors[arm.name])
    ax.axvline(tau, color="black", linestyle="--", linewidth=1.2, label=f"tau={tau:.3f}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(f"CAS ({evaluator} evaluator)")
    ax.set_ylabel("density")
    ax.set_title(f"CAS distribution, {evaluator} evaluator (tail: CAS < tau)")
    ax.legend(fontsize=8, loc="best")
    name = f"cas_hist_{evaluator}"
    path = fig_dir / f"{name}.png"
    _save(fig, path)
    return _Figure(name, f"CAS histograms under the {evaluator} evaluator; dashed line at tau={tau:.3f}.", path)


def _union_in_order(groups: Sequence[Sequence[str]]) -> list[str]:
    """Union of strings, first-seen order."""
    return list(dict.fromkeys(item for group in groups for item in group))


def _per_label(fig_dir: Path, arms: Sequence[Arm], tau: float | None, colors: Mapping[str, str]) -> _Figure | None:
    """Grouped bars of mean train-evaluator CAS (and tail %) per label; None when no arm has "train"."""
    scored = [arm for arm in arms if "train" in arm.cas]
    if not scored:
        return None
    labels = _union_in_order([arm.labels for arm in scored])
    panels = 2 if tau is not None else 1
    fig = Figure(figsize=(max(6.4, 0.35 * len(labels) * len(scored) + 2.0), 3.2 * panels))
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    x = np.arange(len(labels))
    width = 0.8 / len(scored)
    for i, arm in enumerate(scored):
        arm_labels = np.asarray(arm.labels)
        values = np.asarray(arm.cas["train"], dtype=float)
        means, tails = [], []
        for label in labels:
            subset = values[arm_labels == label]
            finite = _finite(subset)
            means.append(float(finite.mean()) if finite.size else np.nan)
            tails.append(_tail_percent(subset, tau) if tau is not None else np.nan)
        offset = (i - (len(scored) - 1) / 2) * width
        axes[0].bar(x + offset, means, width, label=arm.name, color=colors[arm.name])
        if tau is not None:
            axes[1].bar(x + offset, tails, width, label=arm.name, color=colors[arm.name])
    axes[0].set_ylabel("mean CAS (train)")
    axes[0].set_ylim(0.0, 1.0)
    axes[0].set_title("Per-label mean CAS, train evaluator")
    if tau is not None:
        axes[1].set_ylabel(f"tail % (CAS < {tau:.3f})")
        axes[1].set_title("Per-label tail rate, train evaluator")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = fig_dir / "per_label.png"
    _save(fig, path)
    what = "mean CAS and tail rate" if tau is not None else "mean CAS"
    return _Figure("per_label", f"Per-label {what} under the train evaluator, one bar per arm.", path)


def _samples(fig_dir: Path, arm: Arm, slug: str) -> _Figure | None:
    """The arm's sample grid saved as-is (pixel for pixel)."""
    if arm.grid is None:
        return None
    from PIL import Image

    name = f"samples_{slug}"
    path = fig_dir / f"{name}.png"
    Image.fromarray(arm.grid).save(path)
    return _Figure(name, f"Samples from {arm.name}.", path)


def _memorization(fig_dir: Path, arm: Arm, slug: str) -> _Figure | None:
    """Top memorization pairs (generated | nearest real), one row per pair, at most 8."""
    pairs = (arm.memorization_pairs or [])[:MAX_MEMORIZATION_PAIRS]
    if not pairs:
        return None
    fig = Figure(figsize=(4.0, 2.1 * len(pairs)))
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (generated, real, cosine) in zip(axes, pairs, strict=True):
        row[0].imshow(generated)
        row[0].set_title(f"generated (cos={cosine:.3f})", fontsize=8)
        row[1].imshow(real)
        row[1].set_title("nearest real", fontsize=8)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    name = f"memorization_{slug}"
    path = fig_dir / f"{name}.png"
    _save(fig, path)
    return _Figure(name, f"{arm.name}: generated images closest to a real training image, with their cosine.", path)


def _audit(fig_dir: Path, arm: Arm, slug: str) -> _Figure | None:
    """Heat map of judge pass rates, labels x checklist items; blank where a label lacks the item."""
    audit = arm.audit or {}
    labels = list(audit)
    items = _union_in_order([list(checks) for checks in audit.values()])
    if not labels or not items:
        return None
    grid = np.full((len(labels), len(items)), np.nan)
    for r, label in enumerate(labels):
        for c, item in enumerate(items):
            if item in audit[label]:
                grid[r, c] = float(audit[label][item])
    fig = Figure(figsize=(max(4.0, 0.6 * len(items) + 2.0), max(2.5, 0.5 * len(labels) + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for r in range(len(labels)):
        for c in range(len(items)):
            if np.isfinite(grid[r, c]):
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[r, c] > 0.6 else "white")
    ax.set_xticks(np.arange(len(items)), items, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set_title(f"Judge checklist pass rate, {arm.name}")
    fig.colorbar(image, ax=ax, label="pass rate")
    name = f"audit_{slug}"
    path = fig_dir / f"{name}.png"
    _save(fig, path)
    return _Figure(name, f"{arm.name}: judge pass rate per label and checklist item (blank: item not in that label's checklist).", path)


# --------------------------------------------------------------------------------------------
# Markdown and HTML
# --------------------------------------------------------------------------------------------


def markdown_document(title: str, notes: Sequence[str], tables: Sequence[tuple[str, str]],
                      figures: Sequence[_Figure] = ()) -> str:
    """A Markdown page: title, notes, each (heading, pipe table) and, when there are any, figure links."""
    parts = [f"# {title}", ""]
    for note in notes:
        parts += [note, ""]
    for heading, table in tables:
        parts += [f"## {heading}", "", table.strip(), ""]
    if figures:
        parts += ["## Figures", ""]
    for fig in figures:
        parts += [f"![{fig.caption}](figures/{fig.path.name})", ""]
    return "\n".join(parts)


def _split_row(line: str) -> list[str]:
    """Cells of one pipe-table row; `\\|` is a literal pipe inside a cell."""
    line = line.strip()
    line = line.removeprefix("|")
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)]


def parse_markdown_table(text: str) -> tuple[list[str], list[str], list[list[str]]] | None:
    """Parse a simple pipe table into (header cells, column alignments, body rows); None if it is not one."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2 or not _SEPARATOR.match(lines[1].strip()):
        return None
    header = _split_row(lines[0])
    aligns = []
    for spec in _split_row(lines[1]):
        if spec.startswith(":") and spec.endswith(":"):
            aligns.append("center")
        elif spec.endswith(":"):
            aligns.append("right")
        else:
            aligns.append("left")
    width = len(header)
    aligns = (aligns + ["left"] * width)[:width]
    rows = [(_split_row(line) + [""] * width)[:width] for line in lines[2:]]
    return header, aligns, rows


def _table_html(text: str) -> str:
    parsed = parse_markdown_table(text)
    if parsed is None:
        # Not a pipe table: show it verbatim rather than lose it.
        return f"<pre>{html.escape(text.strip())}</pre>"
    header, aligns, rows = parsed

    def cells(tag: str, values: list[str]) -> str:
        return "".join(f'<{tag} style="text-align:{a}">{html.escape(v)}</{tag}>' for v, a in zip(values, aligns, strict=True))

    body = "\n".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table>\n<thead><tr>{cells('th', header)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #e3e3e3; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em .8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #d0d0d0; padding: .3em .7em; }
thead th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; image-rendering: auto; }
figcaption { color: #555; font-size: .9em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
"""


def html_document(title: str, notes: Sequence[str], tables: Sequence[tuple[str, str]],
                  figures: Sequence[_Figure] = ()) -> str:
    """The same page as one self-contained HTML file (tables as HTML, figures embedded as base64 PNG)."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{esc(title)}</h1>"]
    parts += [f'<p class="note">{esc(note)}</p>' for note in notes]
    for heading, table in tables:
        parts += [f"<h2>{esc(heading)}</h2>", _table_html(table)]
    if figures:
        parts.append("<h2>Figures</h2>")
    for fig in figures:
        data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
        parts.append(f'<figure id="fig-{esc(fig.name)}"><img alt="{esc(fig.caption)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{esc(fig.caption)}</figcaption></figure>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
