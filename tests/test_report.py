"""Evaluation reports: files, Markdown links, self-contained HTML, and the HTML rendered in real Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craft_ray.report import Arm, parse_markdown_table, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = ["normal", "pneumonia", "effusion"]
TAUS = {"train": 0.42, "ood": 0.35}
CAS_TABLE = """| arm | CAS (train) | tail % | 95% CI |
|:---|---:|---:|:---:|
| real | 0.712 | 8.3 | [0.69, 0.73] |
| sft | 0.604 | 21.7 | [0.58, 0.63] |
| craft <v2> | 0.688 | 11.2 | [0.66, 0.71] |
"""
DOWNSTREAM_TABLE = """| classifier trained on | AUROC |
|---|---|
| real | 0.91 |
| sft \\| synthetic | 0.84 |
"""
TABLES = [("CAS and tail", CAS_TABLE), ("Downstream classification", DOWNSTREAM_TABLE)]


def _arm(name: str, rng: np.random.Generator, n: int = 60, *, evaluators: tuple[str, ...] = ("train", "ood"),
         grid: bool = True, audit: bool = False, pairs: int = 0, shift: float = 0.0) -> Arm:
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    cas = {ev: np.clip(rng.normal(0.6 + shift, 0.15, n), 0.0, 1.0) for ev in evaluators}
    audit_dict = None
    if audit:
        # Checklists differ per label: "effusion" lacks "cardiac_silhouette" and has its own item.
        audit_dict = {"normal": {"clear_lungs": 0.9, "cardiac_silhouette": 0.75},
                      "pneumonia": {"clear_lungs": 0.2, "cardiac_silhouette": 0.6, "consolidation": 0.55},
                      "effusion": {"blunted_angle": 0.4}}
    memorization = [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                     0.9 - 0.05 * i) for i in range(pairs)]
    return Arm(name=name, labels=labels, cas=cas,
               grid=rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) if grid else None,
               audit=audit_dict, memorization_pairs=memorization or None)


def _arms() -> list[Arm]:
    rng = np.random.default_rng(0)
    sft = _arm("sft", rng, shift=-0.1, pairs=3)
    sft.cas["train"][:5] = np.nan  # a few failed scorings must not break histograms or means
    return [_arm("real", rng, evaluators=("train",), grid=False),  # real set: no ood scores, no grid
            sft, _arm("craft", rng, audit=True, pairs=2)]


EXPECTED_FIGURES = ["cas_hist_train", "cas_hist_ood", "per_label", "samples_sft", "samples_craft",
                    "memorization_sft", "memorization_craft", "audit_craft"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    notes = ["judge missing: no VLM endpoint configured; audit shown for craft only", "tau from real <train> CAS"]
    return write_report(tmp_path_factory.mktemp("report"), title="CXR evaluation & tails", arms=_arms(),
                        taus=TAUS, tables=TABLES, notes=notes)


def test_writes_expected_files(report: dict[str, Path]) -> None:
    assert report["md"].name == "report.md" and report["md"].is_file()
    assert report["html"].name == "report.html" and report["html"].is_file()
    stems = sorted(p.stem for p in report["figures"].glob("*.png"))
    assert stems == sorted(EXPECTED_FIGURES)
    # Arms without grid/audit/pairs get no such figure.
    assert not (report["figures"] / "samples_real.png").exists()
    assert not (report["figures"] / "audit_sft.png").exists()
    assert not (report["figures"] / "memorization_real.png").exists()


def test_sample_grid_saved_pixel_for_pixel(report: dict[str, Path]) -> None:
    saved = np.asarray(Image.open(report["figures"] / "samples_craft.png"))
    assert saved.shape == (48, 64, 3)
    assert np.array_equal(saved, _arms()[2].grid)


def test_plots_have_sensible_sizes(report: dict[str, Path]) -> None:
    hist = Image.open(report["figures"] / "cas_hist_train.png")
    assert hist.size[0] > 300 and hist.size[1] > 200
    # Three pairs stack vertically: taller than wide.
    mem = Image.open(report["figures"] / "memorization_sft.png")
    assert mem.size[1] > mem.size[0]


def test_markdown_has_tables_notes_and_figure_links(report: dict[str, Path]) -> None:
    md = report["md"].read_text(encoding="utf-8")
    assert md.startswith("# CXR evaluation & tails\n")
    assert "judge missing: no VLM endpoint configured" in md
    for heading, table in TABLES:
        assert f"## {heading}" in md
        assert table.strip() in md
    assert md.index("## CAS and tail") < md.index("## Figures")
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert sorted(Path(link).stem for link in links) == sorted(EXPECTED_FIGURES)
    for link in links:
        assert (report["md"].parent / link).is_file()


def test_html_is_self_contained_and_escaped(report: dict[str, Path]) -> None:
    page = report["html"].read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in page
    for forbidden in ('src="http', "href=\"http", "<link", "<script", "url("):
        assert forbidden not in page
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == len(EXPECTED_FIGURES)
    assert all(src.startswith("data:image/png;base64,") for src in srcs)
    for name in EXPECTED_FIGURES:
        assert f'<figure id="fig-{name}">' in page
    assert "<title>CXR evaluation &amp; tails</title>" in page
    assert "tau from real &lt;train&gt; CAS" in page
    assert "<td style=\"text-align:left\">craft &lt;v2&gt;</td>" in page


def test_html_tables_have_right_shape(report: dict[str, Path]) -> None:
    page = report["html"].read_text(encoding="utf-8")
    tables = re.findall(r"<table>.*?</table>", page, flags=re.S)
    assert len(tables) == 2
    cas, downstream = tables
    assert cas.count("<tr>") == 4 and cas.count("<th ") == 4 and cas.count("<td ") == 12
    assert '<th style="text-align:right">CAS (train)</th>' in cas
    assert '<th style="text-align:center">95% CI</th>' in cas
    # An escaped pipe stays inside its cell instead of adding a column.
    assert downstream.count("<tr>") == 3 and downstream.count("<td ") == 4
    assert ">sft | synthetic</td>" in downstream


def test_parse_markdown_table_pads_and_rejects() -> None:
    header, aligns, rows = parse_markdown_table("| a | b | c |\n|---|:-:|--:|\n| 1 | 2 |\n| x | y | z | extra |")
    assert header == ["a", "b", "c"] and aligns == ["left", "center", "right"]
    assert rows == [["1", "2", ""], ["x", "y", "z"]]
    assert parse_markdown_table("just a sentence\nand another") is None


def test_single_arm_edge_cases(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arm = _arm("lora:r8", rng, n=12, evaluators=("train",), grid=True)
    arm.audit = {}  # judge ran but produced nothing: no heat map
    arm.cas["train"][:] = np.nan  # every scoring failed: an empty histogram, not a crash
    out = write_report(tmp_path, title="one arm", arms=[arm], taus={"train": 0.5, "ood": 0.4},
                       tables=[("Not a table", "FD could not be computed")])
    stems = sorted(p.stem for p in out["figures"].glob("*.png"))
    # No arm has "ood" scores, so there is no ood histogram; the arm name becomes a safe file stem.
    assert stems == ["cas_hist_train", "per_label", "samples_lora_r8"]
    page = out["html"].read_text(encoding="utf-8")
    assert "<pre>FD could not be computed</pre>" in page and "<table>" not in page


def test_rejects_bad_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="duplicate arm names"):
        write_report(tmp_path, title="t", arms=[_arm("sft", rng), _arm("sft", rng)], taus=TAUS, tables=[])
    bad = _arm("craft", rng, n=10)
    bad.cas["ood"] = bad.cas["ood"][:7]
    with pytest.raises(ValueError, match=r"CAS under 'ood' has shape \(7,\), expected \(10,\)"):
        write_report(tmp_path, title="t", arms=[bad], taus=TAUS, tables=[])
    floaty = _arm("base", rng, n=10)
    floaty.grid = np.zeros((8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"expected uint8 \[H,W,3\]"):
        write_report(tmp_path, title="t", arms=[floaty], taus=TAUS, tables=[])


def _artifact_dir() -> Path:
    return Path(os.environ.get("CRAFT_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


def test_report_renders_in_headless_chromium(report: dict[str, Path]) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.common.by import By

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(f"needs Debian's chromium and chromedriver on PATH (found chromium={chromium}, "
                    f"chromedriver={chromedriver}); apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,2000"):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    try:
        driver.get(report["html"].resolve().as_uri())
        assert driver.title == "CXR evaluation & tails"
        for name in EXPECTED_FIGURES:
            img = driver.find_element(By.CSS_SELECTOR, f"figure#fig-{name} img")
            width = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            assert width > 0, f"figure {name} did not decode"
        tables = driver.find_elements(By.TAG_NAME, "table")
        assert len(tables) == 2
        assert len(tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")) == 3
        assert tables[0].find_element(By.CSS_SELECTOR, "tbody tr:nth-child(3) td").text == "craft <v2>"
        # Grow the window to the page height so the screenshot shows the whole report.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height) + 100, 12000))
        shot = _artifact_dir() / "report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.stat().st_size > 10_000
    assert Image.open(shot).size[0] >= 1000


def test_memorization_figure_keeps_at_most_eight_pairs(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    heights = {}
    for count in (8, 10):
        arm = _arm("sft", rng, n=6, grid=False, pairs=count)
        out = write_report(tmp_path / str(count), title="t", arms=[arm], taus={}, tables=[])
        heights[count] = Image.open(out["figures"] / "memorization_sft.png").size[1]
    assert heights[10] == heights[8]
