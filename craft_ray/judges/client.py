"""Clients of the judges: over HTTP (anywhere) or by Serve ``DeploymentHandle`` (on the same Ray cluster).

Both have ``p_yes(images, questions)``, so either plugs into :func:`craft_ray.cas.judge_checklist`,
plus ``enrich`` and ``checklist``. Transient failures (connection errors, timeouts, HTTP 429/500/503/504,
dead or restarting replicas, back-pressure) are retried with exponential backoff; everything else is
raised at once with the server's message. :func:`connect` picks the transport.
"""

from __future__ import annotations

import base64
import io
import os
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from craft_ray.errors import UserError
from craft_ray.judges.schemas import MAX_PAIRS_PER_IMAGE

if TYPE_CHECKING:
    from omegaconf import DictConfig

RETRY_STATUS = frozenset({429, 500, 503, 504})


class JudgesError(RuntimeError):
    """The judges kept failing after every retry (server-side trouble, not a bad request)."""


def encode_image(image: Image.Image) -> str:
    """Base64 PNG of a PIL image (what requests carry)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _backoff(attempt: int, base_s: float, max_s: float, retry_after: str | None = None) -> float:
    if retry_after and retry_after.replace(".", "", 1).isdigit():
        return min(float(retry_after), max_s)
    return min(base_s * 2**attempt, max_s) * random.uniform(0.75, 1.25)  # jitter spreads retry storms


def base_url(judges: DictConfig) -> str:
    """``judges.url``, else http://{host}:{port}{route_prefix} (a wildcard bind address means this host)."""
    if judges.url:
        return str(judges.url).rstrip("/")
    host = "127.0.0.1" if judges.host in ("0.0.0.0", "::", "") else judges.host
    return f"http://{host}:{judges.port}{str(judges.route_prefix).rstrip('/')}"


class JudgesClient:
    """The judges over HTTP, with timeouts, retries with exponential backoff and an optional bearer token."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0, retries: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, max_images: int = 64) -> None:
        import httpx

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_images = max_images
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    @classmethod
    def from_config(cls, judges: DictConfig, **kwargs: Any) -> JudgesClient:
        """Client of ``judges.*``: URL, token from ``$judges.token_env``, timeout, retries, image limit."""
        opts = {"token": os.environ.get(judges.token_env) or None, "timeout_s": float(judges.request_timeout_s),
                "retries": int(judges.client_retries), "max_images": int(judges.max_images)} | kwargs
        return cls(base_url(judges), **opts)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> JudgesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One API call with retries; returns the JSON answer, raises UserError (4xx) or JudgesError (5xx)."""
        httpx = self._httpx
        last = ""
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                r = self.http.request(method, path, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code < 400:
                    return r.json()
                message = _message(r)
                if r.status_code not in RETRY_STATUS:
                    hint = " (set the token in the environment variable named by judges.token_env)" \
                        if r.status_code == 401 else ""
                    raise UserError(f"judges at {self.url} answered {method} {path} with HTTP {r.status_code}: "
                                    f"{message}{hint}")
                last, retry_after = f"HTTP {r.status_code}: {message}", r.headers.get("retry-after")
            if attempt < self.retries:
                time.sleep(_backoff(attempt, self.backoff_s, self.max_backoff_s, retry_after))
        if last.startswith("HTTP"):
            raise JudgesError(f"judges at {self.url} failed {method} {path} {self.retries + 1} times; last: {last}")
        raise UserError(f"cannot reach the judges at {self.url} after {self.retries + 1} attempts ({last}); start "
                        "them with `python -m craft_ray.serve` or fix judges.url / judges.host / judges.port")

    # ------------------------------------------------------------ API
    def health(self) -> dict:
        """GET /v1/health."""
        return self.request("GET", "/v1/health")

    def models(self) -> list[str]:
        """Ids of the served models (GET /v1/models)."""
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]

    def enrich(self, modality: str, label: str, n: int = 8, *, seed: int | None = None,
               dataset: str | None = None) -> list[str]:
        """``n`` enriched prompts for (modality, label)."""
        body = {"modality": modality, "label": label, "dataset": dataset, "n": n, "seed": seed}
        return self.request("POST", "/v1/enrich", body)["prompts"]

    def checklist(self, modality: str, label: str, k: int = 6, *, dataset: str | None = None) -> list[dict]:
        """``k`` checklist items ``{id, question, present, absent, parent}`` for (modality, label)."""
        body = {"modality": modality, "label": label, "dataset": dataset, "k": k}
        return self.request("POST", "/v1/checklist", body)["items"]

    def judge(self, modality: str, label: str, images: Sequence[Image.Image], *, items: list[dict] | None = None,
              dataset: str | None = None) -> list[dict]:
        """Per image ``{items: [{id, p_yes}], score, gated_score}``; requests of at most ``max_images`` images."""
        out: list[dict] = []
        for i in range(0, len(images), self.max_images):
            body = {"modality": modality, "label": label, "dataset": dataset, "items": items,
                    "images": [encode_image(img) for img in images[i:i + self.max_images]]}
            out += self.request("POST", "/v1/judge", body)["results"]
        return out

    def p_yes(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[float]:
        """P(yes) per (image, question) pair; each distinct image object is sent once per request."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        out: list[float] = []
        index: dict[int, int] = {}
        encoded: list[str] = []
        pairs: list[dict] = []

        def flush() -> None:
            if pairs:
                out.extend(self.request("POST", "/v1/p_yes", {"images": encoded, "pairs": pairs})["p_yes"])
            index.clear()
            encoded.clear()
            pairs.clear()

        for img, question in zip(images, questions, strict=True):
            new = id(img) not in index
            if (new and len(encoded) == self.max_images) or len(pairs) == self.max_images * MAX_PAIRS_PER_IMAGE:
                flush()
                new = True
            if new:
                index[id(img)] = len(encoded)
                encoded.append(encode_image(img))
            pairs.append({"image": index[id(img)], "question": question})
        flush()
        return out

    def chat(self, body: dict) -> dict:
        """POST /v1/chat/completions with an OpenAI request body; the OpenAI response object."""
        return self.request("POST", "/v1/chat/completions", body)


def _message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


class HandleClient:
    """The judges by ``DeploymentHandle``, for callers on the same Ray cluster (Train workers): no HTTP hop."""

    def __init__(self, app_name: str = "craft_judges", *, dataset: str = "phantom", timeout_s: float = 30.0,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0) -> None:
        from ray import serve

        self.app_name = app_name
        self.dataset = dataset
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._handle = lambda name: serve.get_deployment_handle(name, app_name=app_name)

    @classmethod
    def from_config(cls, cfg: DictConfig, **kwargs: Any) -> HandleClient:
        """Client of an experiment config (``judges.*``, ``data.dataset``)."""
        j = cfg.judges
        opts = {"dataset": str(cfg.data.dataset), "timeout_s": float(j.request_timeout_s),
                "retries": int(j.client_retries)} | kwargs
        return cls(str(j.app_name), **opts)

    def _call(self, deployment: str, method: str, *args: Any) -> Any:
        from ray.exceptions import GetTimeoutError, RayActorError
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        transient = (RayActorError, BackPressureError, ReplicaUnavailableError, GetTimeoutError, TimeoutError)
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._handle(deployment), method).remote(*args).result(timeout_s=self.timeout_s)
            except transient as exc:
                if attempt == self.retries:
                    raise JudgesError(f"{deployment}.{method} of app {self.app_name!r} failed {attempt + 1} times; "
                                      f"last: {type(exc).__name__}: {exc}") from exc
                time.sleep(_backoff(attempt, self.backoff_s, self.max_backoff_s))
        raise AssertionError("unreachable")

    def p_yes(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[float]:
        """P(yes) per (image, question) pair, batched with every other caller's pairs by the judge."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return self._call("ChecklistJudge", "p_yes", list(images), list(questions))

    def enrich(self, modality: str, label: str, n: int = 8, *, seed: int | None = None,
               dataset: str | None = None) -> list[str]:
        """``n`` enriched prompts for (modality, label)."""
        return self._call("PromptEnricher", "enrich", modality, label, dataset or self.dataset, n, seed)

    def checklist(self, modality: str, label: str, k: int = 6, *, dataset: str | None = None) -> list[dict]:
        """``k`` checklist items for (modality, label)."""
        return self._call("ChecklistBuilder", "build", modality, label, dataset or self.dataset, k)


def serve_app_running(app_name: str) -> bool:
    """Whether this process is on a Ray cluster where Serve runs ``app_name``."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        from ray import serve

        app = serve.status().applications.get(app_name)
    except Exception:  # no Serve instance on this cluster
        return False
    return app is not None and app.status == "RUNNING"  # ApplicationStatus is a str enum


def connect(cfg: DictConfig, **kwargs: Any) -> JudgesClient | HandleClient:
    """A handle client when the judges app runs on this process's Ray cluster, else an HTTP client."""
    if serve_app_running(str(cfg.judges.app_name)):
        return HandleClient.from_config(cfg, **kwargs)
    return JudgesClient.from_config(cfg.judges, **kwargs)


def connect_or_none(cfg: DictConfig) -> JudgesClient | HandleClient | None:
    """:func:`connect` with ``judges.client_retries``, or None (and a printed line) when that fails: an
    evaluation goes on without the judge and records it as missing."""
    try:
        return connect(cfg, retries=int(cfg.judges.client_retries))
    except Exception as exc:
        print(f"checklist judge unavailable: {type(exc).__name__}: {exc}", flush=True)
        return None

