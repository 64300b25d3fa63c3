"""The whole reader study in a real headless Chromium: create, two readers, mouse and keyboard, a killed server.

Everything goes through the command line (``create``, ``token``, ``serve``, ``results``) and the browser;
the only look behind the curtain is reading study.db to know which arm each shown image belongs to,
so the expected results can be counted from the votes actually cast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_study import fabricate_evaluation

pytest.importorskip("selenium")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver on PATH")]

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def study_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "craft_ray.study", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out


class Server:
    """``study serve`` as a child process; only this process is ever killed."""

    def __init__(self, cwd: Path, name: str, port: int = 0) -> None:
        self.log = open(cwd / f"serve-{port}.log", "w")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen([sys.executable, "-m", "craft_ray.study", "serve", name, "--port", str(port)],
                                     cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        assert "serving study" in line, (line, (cwd / f"serve-{port}.log").read_text())
        self.url = line.split(" at ")[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def driver() -> Iterator[object]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    d = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield d
    finally:
        d.quit()


def test_full_study_in_chromium(tmp_path: Path, driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    labels = ("no_finding", "cardiomegaly")
    a = fabricate_evaluation(tmp_path / "eval-a", "demo-sft", labels=labels, size=64, seed=1)
    b = fabricate_evaluation(tmp_path / "eval-b", "demo-craft", labels=labels, size=64, seed=2)
    study_cli("create", "pref", "--runs", str(a), str(b), "--seed", "0", cwd=tmp_path)
    issued = study_cli("token", "pref", "--reader", "alice", "--reader", "bob", cwd=tmp_path).stdout.splitlines()
    tokens = {line.split("\t")[0]: line.split("\t")[1] for line in issued}
    db = tmp_path / "studies" / "pref" / "study.db"
    conn = sqlite3.connect(db)
    arm_of = dict(conn.execute("SELECT i.token, a.name FROM images i JOIN arms a ON a.id = i.arm_id"))
    conn.close()

    by_id = lambda i: driver.find_element(By.ID, i)  # noqa: E731
    wait = WebDriverWait(driver, 20)
    votes: dict[str, dict[tuple[str, str], str]] = {"alice": {}, "bob": {}}

    def shown() -> tuple[str, str]:
        """The image tokens of the pair on screen (left, right)."""
        return tuple(by_id(f"img-{s}").get_attribute("src").rsplit("/", 1)[1].removesuffix(".png")
                     for s in ("left", "right"))

    def progress(text: str) -> None:
        wait.until(lambda d: by_id("progress").text == text)

    def answer(reader: str, how: str, done_after: int) -> None:
        pair = shown()
        if how in ("left", "right", "tie"):
            by_id(f"choose-{how}").click()
            choice = how
        else:
            ActionChains(driver).send_keys(how).perform()
            choice = {Keys.ARROW_LEFT: "left", "1": "left", Keys.ARROW_RIGHT: "right", "2": "right",
                      Keys.SPACE: "tie", "0": "tie"}[how]
        votes[reader][pair] = choice
        progress(f"{done_after} / 6")

    server = Server(tmp_path, "pref")
    try:
        driver.get(f"{server.url}?token={tokens['alice']}")
        progress("0 / 6")
        assert driver.current_url == server.url  # the token left the address bar
        assert "demo" not in driver.page_source
        assert by_id("position").text == "pair 1 of 6"
        # Mouse: rate both images, give a reason, pick left.
        by_id("rating-left").find_elements(By.TAG_NAME, "button")[3].click()
        by_id("rating-right").find_elements(By.TAG_NAME, "button")[1].click()
        by_id("reason").send_keys("left: sharper cardiac silhouette")
        wait.until(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth === 64)"))
        artifacts = Path(os.environ.get("CRAFT_TEST_ARTIFACTS", REPO / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(artifacts / "study.png"))
        answer("alice", "left", 1)
        answer("alice", "right", 2)
        answer("alice", Keys.ARROW_LEFT, 3)
        answer("alice", "0", 4)

        server.kill()  # SIGKILL mid-study: nothing answered may be lost
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 4
        conn.close()
        server = Server(tmp_path, "pref", port=server.port)
        driver.refresh()
        progress("4 / 6")
        assert by_id("position").text == "pair 5 of 6"  # resumes at the first unanswered pair

        # Previous (key p) shows the answered 4th pair with its answer; the right arrow changes it.
        ActionChains(driver).send_keys("p").perform()
        wait.until(lambda d: by_id("position").text == "pair 4 of 6")
        assert "chosen" in by_id("choose-tie").get_attribute("class")
        assert shown() in votes["alice"] and votes["alice"][shown()] == "tie"
        answer("alice", Keys.ARROW_RIGHT, 4)
        wait.until(lambda d: by_id("position").text == "pair 5 of 6")
        answer("alice", "2", 5)
        answer("alice", "left", 6)
        wait.until(lambda d: by_id("finished").is_displayed())

        by_id("signout").click()
        wait.until(lambda d: by_id("token").is_displayed())
        by_id("token").send_keys(tokens["bob"])
        by_id("token").send_keys(Keys.ENTER)
        progress("0 / 6")
        for i, key in enumerate(["1", Keys.SPACE, Keys.ARROW_RIGHT, "2", Keys.ARROW_LEFT, "1"], start=1):
            answer("bob", key, i)
        wait.until(lambda d: by_id("finished").is_displayed())
    finally:
        server.kill()

    out = study_cli("results", "pref", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert "## Arms" in out.stdout and "MLflow:" in out.stdout
    res = json.loads((tmp_path / "studies" / "pref" / "results.json").read_text())
    wins: Counter[str] = Counter()
    for reader_votes in votes.values():
        for (left, right), choice in reader_votes.items():
            if choice != "tie":
                wins[arm_of[left if choice == "left" else right]] += 1
    ties = sum(c == "tie" for v in votes.values() for c in v.values())
    arms = {r["arm"]: r for r in res["arms"]}
    assert {k: arms[k]["wins"] for k in arms} == {"demo-sft": wins["demo-sft"], "demo-craft": wins["demo-craft"]}
    (comp,) = res["comparisons"]
    assert (comp["votes"], comp["ties"]) == (12, ties)
    decisive = wins["demo-sft"] + wins["demo-craft"]
    assert arms["demo-sft"]["win_rate"] == pytest.approx(wins["demo-sft"] / decisive)
    assert [(r["name"], r["answered"]) for r in res["readers"]] == [("alice", 6), ("bob", 6)]
    assert res["agreement"]["method"] == "Cohen" and res["agreement"]["shared_pairs"] == 6
    # Ratings and the reason of the first pair, as given with the mouse.
    rated = {r["arm"]: r["rating_n"] for r in res["arms"]}
    assert sum(rated.values()) == 2
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT rating_left, rating_right, reason FROM answers WHERE reason != ''").fetchall() == [
        (4, 2, "left: sharper cardiac silhouette")]
    stored = {(r, lt, rt): c for r, lt, rt, c in conn.execute(
        "SELECT rd.name, li.token, ri.token, s.choice FROM answers s JOIN readers rd ON rd.id = s.reader_id "
        "JOIN pairs p ON p.id = s.pair_id JOIN images li ON li.id = p.left_image JOIN images ri ON ri.id = p.right_image")}
    conn.close()
    assert stored == {(r, lt, rt): c for r, v in votes.items() for (lt, rt), c in v.items()}
