"""The SQLite store of one reader study: arms, images, pairs, readers, per-reader orders and answers.

One file, ``<study>/study.db``, in WAL mode with ``synchronous=FULL``: every answer is committed (and
on disk) before the request that carries it returns, so a killed server loses nothing already answered.
Every call opens its own short-lived connection, which makes the store safe to use from the web
server's thread pool. Reader tokens are kept only as SHA-256 hashes; the plain token is shown once,
when it is issued.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.errors import UserError

DB_FILE = "study.db"
IMAGES_DIR = "images"
CHOICES = ("left", "right", "tie")  # "tie" is the reader's "can't tell"

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE arms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE, arm_id INTEGER NOT NULL REFERENCES arms(id),
    label TEXT NOT NULL, seed INTEGER, source TEXT NOT NULL);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE, label TEXT NOT NULL,
    left_image INTEGER NOT NULL REFERENCES images(id), right_image INTEGER NOT NULL REFERENCES images(id));
CREATE TABLE readers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE assignments (
    reader_id INTEGER NOT NULL REFERENCES readers(id), pair_id INTEGER NOT NULL REFERENCES pairs(id),
    position INTEGER NOT NULL, PRIMARY KEY (reader_id, pair_id), UNIQUE (reader_id, position));
CREATE TABLE answers (
    reader_id INTEGER NOT NULL, pair_id INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN {CHOICES}),
    rating_left INTEGER CHECK (rating_left BETWEEN 1 AND 5),
    rating_right INTEGER CHECK (rating_right BETWEEN 1 AND 5),
    reason TEXT NOT NULL DEFAULT '', answered_at TEXT NOT NULL, changes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (reader_id, pair_id),
    FOREIGN KEY (reader_id, pair_id) REFERENCES assignments(reader_id, pair_id));
"""


@dataclass(frozen=True)
class Arm:
    """One image source of a study: a generator's evaluation or the held-out real images."""

    name: str  # shown in results only, never to readers
    kind: str  # "generator" or "real"
    source: str  # evaluation folder / MLflow run id, or the dataset


@dataclass(frozen=True)
class StudyImage:
    """One image copied into the study folder as ``images/<token>.png``."""

    token: str  # opaque random id; the only name readers see
    arm: str
    label: str
    seed: int | None  # prompt seed (None for real images)
    source: str  # where it was copied from


@dataclass(frozen=True)
class Pair:
    """Two images of one label from two arms, in the left/right order drawn at creation."""

    token: str  # opaque random id sent to readers
    label: str
    left: str  # image token
    right: str  # image token


@dataclass(frozen=True)
class Reader:
    id: int
    name: str


@dataclass(frozen=True)
class Vote:
    """One stored answer with the arms behind it (for results; never sent to readers)."""

    reader: str
    pair: str
    label: str
    left_arm: str
    right_arm: str
    choice: str
    rating_left: int | None
    rating_right: int | None
    reason: str


class AlreadyAnswered(Exception):
    """The reader answered this pair before and did not ask to change the answer."""


def new_token(nbytes: int = 16) -> str:
    """A URL-safe random token."""
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Store:
    """Access to ``<study>/study.db``; :meth:`initialise` writes a new study, the rest read and answer."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / DB_FILE

    @classmethod
    def open(cls, folder: str | Path) -> Store:
        """The store of an existing study folder (UserError when there is none)."""
        store = cls(folder)
        if not store.path.is_file():
            raise UserError(f"no study in {store.folder} (no {DB_FILE}); create one with "
                            "`python -m craft_ray.study create NAME --runs RUN_A RUN_B`")
        return store

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, rolls back on error, and is always closed."""
        conn = sqlite3.connect(self.path, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            # FULL: in WAL mode the default (NORMAL) may lose the last commits on power loss.
            conn.execute("PRAGMA synchronous = FULL")
            with conn:
                yield conn
        finally:
            conn.close()

    def initialise(self, meta: Mapping[str, Any], arms: Sequence[Arm], images: Sequence[StudyImage],
                   pairs: Sequence[Pair]) -> None:
        """Write a new study (the folder must not hold one yet)."""
        if self.path.exists():
            raise UserError(f"a study already exists in {self.folder}; choose another name or delete that folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: readers and the writer never block each other
        conn.close()
        with self.connect() as c:
            c.executescript(_SCHEMA)
            c.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            c.executemany("INSERT INTO arms (name, kind, source) VALUES (?, ?, ?)",
                          [(a.name, a.kind, a.source) for a in arms])
            arm_ids = {r["name"]: r["id"] for r in c.execute("SELECT id, name FROM arms")}
            c.executemany("INSERT INTO images (token, arm_id, label, seed, source) VALUES (?, ?, ?, ?, ?)",
                          [(i.token, arm_ids[i.arm], i.label, i.seed, i.source) for i in images])
            image_ids = {r["token"]: r["id"] for r in c.execute("SELECT id, token FROM images")}
            c.executemany("INSERT INTO pairs (token, label, left_image, right_image) VALUES (?, ?, ?, ?)",
                          [(p.token, p.label, image_ids[p.left], image_ids[p.right]) for p in pairs])

    def meta(self) -> dict[str, Any]:
        """The creation config (name, modality, arms' sources, seed, pair settings)."""
        with self.connect() as c:
            return {r["key"]: json.loads(r["value"]) for r in c.execute("SELECT key, value FROM meta")}

    def arms(self) -> list[Arm]:
        with self.connect() as c:
            return [Arm(r["name"], r["kind"], r["source"]) for r in c.execute("SELECT * FROM arms ORDER BY id")]

    def pairs(self) -> list[tuple[Pair, str, str]]:
        """Every pair with its (left arm, right arm), in creation order."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT p.token, p.label, li.token AS lt, ri.token AS rt, la.name AS la, ra.name AS ra "
                "FROM pairs p JOIN images li ON li.id = p.left_image JOIN images ri ON ri.id = p.right_image "
                "JOIN arms la ON la.id = li.arm_id JOIN arms ra ON ra.id = ri.arm_id ORDER BY p.id").fetchall()
        return [(Pair(r["token"], r["label"], r["lt"], r["rt"]), r["la"], r["ra"]) for r in rows]

    # ---------------------------------------------------------------------------------------- readers

    def add_reader(self, name: str) -> str:
        """Register a reader with every pair in their own random order; returns the plain token (shown once)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise UserError(f"reader name {name!r} must be 1 to 100 characters")
        token = new_token()
        seed = int(self.meta().get("seed", 0))
        with self.connect() as c:
            if c.execute("SELECT 1 FROM readers WHERE name = ?", (name,)).fetchone():
                raise UserError(f"reader {name!r} already has a token in {self.folder}; "
                                "list readers with `token NAME --list`, or pick another reader name")
            reader_id = c.execute("INSERT INTO readers (name, token_hash, created) VALUES (?, ?, ?)",
                                  (name, hash_token(token), _now())).lastrowid
            pair_ids = [r["id"] for r in c.execute("SELECT id FROM pairs ORDER BY id")]
            # Seeded by (study seed, reader): a reader's order is reproducible and differs between readers.
            order = np.random.default_rng([seed, reader_id]).permutation(len(pair_ids))
            c.executemany("INSERT INTO assignments VALUES (?, ?, ?)",
                          [(reader_id, pair_ids[j], pos) for pos, j in enumerate(order.tolist(), start=1)])
        return token

    def reader(self, token: str) -> Reader | None:
        """The reader a token belongs to, or None."""
        with self.connect() as c:
            row = c.execute("SELECT id, name FROM readers WHERE token_hash = ?", (hash_token(token),)).fetchone()
        return Reader(row["id"], row["name"]) if row else None

    def readers(self) -> list[dict[str, Any]]:
        """[{name, answered, total, created}] for every reader."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT r.name, r.created, (SELECT COUNT(*) FROM assignments a WHERE a.reader_id = r.id) AS total, "
                "(SELECT COUNT(*) FROM answers s WHERE s.reader_id = r.id) AS answered FROM readers r ORDER BY r.id")
            return [dict(r) for r in rows]

    # --------------------------------------------------------------------------------- what readers see

    def progress(self, reader_id: int) -> tuple[int, int]:
        """(answered, assigned) pairs of a reader."""
        with self.connect() as c:
            total = c.execute("SELECT COUNT(*) FROM assignments WHERE reader_id = ?", (reader_id,)).fetchone()[0]
            done = c.execute("SELECT COUNT(*) FROM answers WHERE reader_id = ?", (reader_id,)).fetchone()[0]
        return done, total

    def next_position(self, reader_id: int) -> int | None:
        """Position (1-based) of the reader's first unanswered pair; None when all are answered."""
        with self.connect() as c:
            row = c.execute(
                "SELECT MIN(a.position) FROM assignments a LEFT JOIN answers s "
                "ON s.reader_id = a.reader_id AND s.pair_id = a.pair_id "
                "WHERE a.reader_id = ? AND s.pair_id IS NULL", (reader_id,)).fetchone()
        return row[0]

    def item(self, reader_id: int, position: int) -> dict[str, Any] | None:
        """What the reader sees at a position: pair token, label, image tokens and their own answer (or None)."""
        with self.connect() as c:
            row = c.execute(
                "SELECT a.position, p.token, p.label, li.token AS left, ri.token AS right, s.choice, "
                "s.rating_left, s.rating_right, s.reason FROM assignments a "
                "JOIN pairs p ON p.id = a.pair_id JOIN images li ON li.id = p.left_image "
                "JOIN images ri ON ri.id = p.right_image "
                "LEFT JOIN answers s ON s.reader_id = a.reader_id AND s.pair_id = a.pair_id "
                "WHERE a.reader_id = ? AND a.position = ?", (reader_id, position)).fetchone()
        if row is None:
            return None
        answer = None if row["choice"] is None else {
            "choice": row["choice"], "rating_left": row["rating_left"], "rating_right": row["rating_right"],
            "reason": row["reason"]}
        return {"position": row["position"], "pair": row["token"], "label": row["label"], "left": row["left"],
                "right": row["right"], "answer": answer}

    def assigned_pair(self, reader_id: int, pair_token: str) -> int | None:
        """The internal id of a pair assigned to this reader, else None (unknown, other study, not theirs)."""
        with self.connect() as c:
            row = c.execute("SELECT p.id FROM pairs p JOIN assignments a ON a.pair_id = p.id "
                            "WHERE p.token = ? AND a.reader_id = ?", (pair_token, reader_id)).fetchone()
        return row[0] if row else None

    def answer(self, reader_id: int, pair_id: int, choice: str, rating_left: int | None = None,
               rating_right: int | None = None, reason: str = "", change: bool = False) -> None:
        """Store (commit) one answer; raises AlreadyAnswered when one exists and ``change`` is false."""
        with self.connect() as c:
            old = c.execute("SELECT changes FROM answers WHERE reader_id = ? AND pair_id = ?",
                            (reader_id, pair_id)).fetchone()
            if old is not None and not change:
                raise AlreadyAnswered(f"pair already answered by reader {reader_id}")
            c.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (reader_id, pair_id, choice, rating_left, rating_right, reason, _now(),
                       0 if old is None else old["changes"] + 1))

    def image_file(self, token: str) -> Path | None:
        """The PNG of an image token, or None when the study has no such image."""
        with self.connect() as c:
            row = c.execute("SELECT 1 FROM images WHERE token = ?", (token,)).fetchone()
        return self.folder / IMAGES_DIR / f"{token}.png" if row else None

    # ----------------------------------------------------------------------------------------- results

    def votes(self) -> list[Vote]:
        """Every stored answer with the arms of its left and right image."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT r.name AS reader, p.token AS pair, p.label, la.name AS left_arm, ra.name AS right_arm, "
                "s.choice, s.rating_left, s.rating_right, s.reason FROM answers s "
                "JOIN readers r ON r.id = s.reader_id JOIN pairs p ON p.id = s.pair_id "
                "JOIN images li ON li.id = p.left_image JOIN images ri ON ri.id = p.right_image "
                "JOIN arms la ON la.id = li.arm_id JOIN arms ra ON ra.id = ri.arm_id ORDER BY s.reader_id, p.id")
            return [Vote(**dict(r)) for r in rows]
