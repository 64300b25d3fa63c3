"""The judges Serve application: FastAPI ingress (judges API + OpenAI chat subset) over three deployments.

Routes (all JSON; errors are ``{"error": {"message", "type", "code"}}``):

- ``POST /v1/enrich`` ``{modality, label, dataset?, n, seed?}`` -> ``{prompts}``
- ``POST /v1/checklist`` ``{modality, label, dataset?, k}`` -> ``{items: [{id, question, present, absent, parent}]}``
- ``POST /v1/judge`` ``{modality, label, dataset?, images, items?}`` -> per image ``{items: [{id, p_yes}], score,
  gated_score}``; items default to the knowledge file of (modality, dataset)
- ``POST /v1/p_yes`` ``{images, pairs: [{image, question}]}`` -> ``{p_yes}`` (what the client's ``p_yes`` uses)
- ``POST /v1/chat/completions`` (OpenAI subset), ``GET /v1/models``, ``GET /v1/health`` (no token needed)

:func:`build_app` is the Serve builder (``import_path: craft_ray.judges.app:build_app``);
:func:`application` builds the same app from a resolved experiment config.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from craft_ray.errors import UserError
from craft_ray.judges.deployments import ChecklistBuilder, ChecklistJudge, PromptEnricher
from craft_ray.judges.schemas import (
    MAX_PAIRS_PER_IMAGE,
    ApiError,
    ChecklistRequest,
    ChecklistResponse,
    EnrichRequest,
    EnrichResponse,
    ImageJudgement,
    ItemScore,
    JudgeRequest,
    JudgeResponse,
    Limits,
    PYesRequest,
    PYesResponse,
    check_chat_images,
    check_image_count,
    check_label,
    decode_image,
    error_body,
)
from craft_ray.knowledge import Knowledge, checklist_judge, load_knowledge, load_shipped
from craft_ray.models.engines import EngineError, chat_response, parse_chat_request

REPLICA_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # one torch thread per replica
GENERATORS = ("PromptEnricher", "ChecklistBuilder")  # judges.generators_on_demand starts these on first use


@dataclass(frozen=True)
class ApiSettings:
    """What the ingress needs besides its backend."""

    model: str  # served model name (/v1/models, chat "model")
    limits: Limits
    token_sha256: str | None  # sha256 hex of the bearer token; None = no auth
    dataset: str  # default label set when a request names none
    knowledge_path: str | None  # knowledge file for /v1/judge when it matches the request; else the shipped one
    default_max_tokens: int  # chat completions without max_tokens


class Backend(Protocol):
    """The model side of the API (the Serve deployments behind the ingress)."""

    async def enrich(self, modality: str, label: str, dataset: str, n: int, seed: int | None) -> list[str]: ...
    async def checklist(self, modality: str, label: str, dataset: str, k: int) -> list[dict]: ...
    async def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]: ...
    async def generate(self, messages: list[dict], kwargs: dict) -> Any: ...
    async def health(self) -> dict: ...


# ---------------------------------------------------------------- the HTTP API
class Guard:
    """ASGI middleware: bearer token (401) and request body size (413) before any parsing."""

    def __init__(self, app: Any, settings: ApiSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        public = scope["path"].rstrip("/").endswith("/v1/health")
        if self.settings.token_sha256 and not public:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = hashlib.sha256(token.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.settings.token_sha256):
                why = "wrong" if headers.get("authorization", "").strip() else "missing"
                return await _send(send, 401, f"{why} bearer token: send 'Authorization: Bearer <token>' with the "
                                              "token the server was started with", {"www-authenticate": "Bearer"})
        limit = self.settings.limits.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _send(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                          "(judges.max_request_bytes): send fewer or smaller images")
        body, more, size = [], True, 0
        while more:  # buffer the body (JSON is parsed whole anyway), counting bytes of chunked uploads
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send(send, 413, f"request body exceeds the limit of {limit} bytes "
                                              "(judges.max_request_bytes): send fewer or smaller images")
            body.append(chunk)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


async def _send(send: Any, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _error_response(status: int, message: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return 400, f"malformed JSON body: {ctx.get('error', err.get('msg'))}"
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        if err.get("type") == "missing" and loc == "body":
            return 400, "request body is missing: send a JSON object"
        if loc == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
            return 400, "request body must be a JSON object sent with 'Content-Type: application/json'"
        parts.append(f"{loc}: {err.get('msg')}")
    return 422, "invalid request: " + "; ".join(parts)


def _items_tree(items: list[dict]) -> None:
    ids = [it["id"] for it in items]
    for i, ident in enumerate(ids):
        if ident in ids[:i]:
            raise ApiError(422, f"items[{i}].id {ident!r} is repeated; item ids must be unique")
    for i, it in enumerate(items):
        if it.get("parent") is not None and it["parent"] not in ids:
            raise ApiError(422, f"items[{i}].parent {it['parent']!r} is not an item id; ids: {', '.join(ids)}")


def create_api(settings: ApiSettings, backend: Backend) -> FastAPI:
    """The FastAPI app of the judges over ``backend``; no Ray needed here."""
    api = FastAPI(title="craft_ray judges", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(Guard, settings=settings)
    limits = settings.limits
    knowledge: dict[tuple[str, str], Knowledge] = {}

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.retry_after_s)

    @api.exception_handler(UserError)
    async def _user_error(_: Request, exc: UserError) -> JSONResponse:
        return _error_response(422, str(exc))

    @api.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return _error_response(502, f"the model's answer was unusable: {exc}")

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(*_validation_message(exc))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        return _error_response(exc.status_code, str(message))

    def knowledge_of(modality: str, dataset: str) -> Knowledge:
        key = (modality, dataset)
        if key not in knowledge:
            custom = load_knowledge(settings.knowledge_path) if settings.knowledge_path else None
            if custom is not None and (custom.modality, custom.dataset) == key:
                knowledge[key] = custom
            else:
                knowledge[key] = load_shipped(modality, dataset)
        return knowledge[key]

    async def decode_all(images: list[str]) -> list[Image.Image]:
        check_image_count(len(images), limits)
        return await run_in_threadpool(lambda: [decode_image(d, limits, f"images[{i}]") for i, d in enumerate(images)])

    @api.post("/v1/enrich", response_model=EnrichResponse)
    async def enrich(req: EnrichRequest) -> EnrichResponse:
        dataset = req.dataset or settings.dataset
        check_label(req.modality, req.label, dataset)
        prompts = await backend.enrich(req.modality, req.label, dataset, req.n, req.seed)
        return EnrichResponse(model=settings.model, modality=req.modality, label=req.label, dataset=dataset,
                              prompts=prompts)

    @api.post("/v1/checklist", response_model=ChecklistResponse)
    async def checklist(req: ChecklistRequest) -> ChecklistResponse:
        dataset = req.dataset or settings.dataset
        check_label(req.modality, req.label, dataset)
        items = await backend.checklist(req.modality, req.label, dataset, req.k)
        return ChecklistResponse(model=settings.model, modality=req.modality, label=req.label, dataset=dataset,
                                 items=items)

    @api.post("/v1/judge", response_model=JudgeResponse)
    async def judge(req: JudgeRequest) -> JudgeResponse:
        dataset = req.dataset or settings.dataset
        check_label(req.modality, req.label, dataset)
        images = await decode_all(req.images)
        if req.items is not None:
            items = [it.model_dump() for it in req.items]
            _items_tree(items)
            version = "request"
        else:
            know = knowledge_of(req.modality, dataset)
            items = [it.to_dict() for it in know.checklist(req.label)]
            version = know.version
        pair_images = [img for img in images for _ in items]
        questions = [it["question"] for _ in images for it in items]
        p = np.asarray(await backend.p_yes(pair_images, questions), dtype=np.float64).reshape(len(images), len(items))
        ids = [it["id"] for it in items]
        parents = {it["id"]: it.get("parent") for it in items}
        score = checklist_judge(p, ids, parents, gating=False)
        gated = checklist_judge(p, ids, parents, gating=True)
        results = [ImageJudgement(items=[ItemScore(id=i, p_yes=float(v)) for i, v in zip(ids, row, strict=True)],
                                  score=float(s), gated_score=float(g))
                   for row, s, g in zip(p, score, gated, strict=True)]
        return JudgeResponse(model=settings.model, modality=req.modality, label=req.label, dataset=dataset,
                             knowledge=version, results=results)

    @api.post("/v1/p_yes", response_model=PYesResponse)
    async def p_yes(req: PYesRequest) -> PYesResponse:
        limit = limits.max_images * MAX_PAIRS_PER_IMAGE
        if len(req.pairs) > limit:
            raise ApiError(413, f"{len(req.pairs)} pairs in one request; the limit is {limit}: split the request")
        for i, pair in enumerate(req.pairs):
            if pair.image >= len(req.images):
                raise ApiError(422, f"pairs[{i}].image {pair.image} is out of range: the request has "
                                    f"{len(req.images)} images")
        images = await decode_all(req.images)
        values = await backend.p_yes([images[p.image] for p in req.pairs], [p.question for p in req.pairs])
        return PYesResponse(model=settings.model, p_yes=values)

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
        if body.get("model") != settings.model:
            raise ApiError(404, f"model {body.get('model')!r} is not served here; GET /v1/models lists "
                                f"{settings.model!r}")
        if isinstance(body.get("messages"), list):  # limits first: nothing is decoded past them
            await run_in_threadpool(check_chat_images, body["messages"], limits)
        try:
            messages, kwargs = parse_chat_request(body, settings.default_max_tokens)
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        completion = await backend.generate(messages, kwargs)
        return JSONResponse(chat_response(completion, settings.model, logprobs=kwargs["logprobs"],
                                          request_id=f"chatcmpl-{uuid.uuid4().hex}"))

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model, "object": "model", "created": 0,
                                            "owned_by": "craft_ray"}]}

    @api.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model, "deployments": await backend.health()}

    return api


# ---------------------------------------------------------------- the Serve ingress
def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


@serve.deployment
@serve.ingress()
class JudgesIngress:
    """HTTP ingress: validates and decodes requests, fans them out to the deployments by handle."""

    def __init__(self, enricher: DeploymentHandle, builder: DeploymentHandle, judge: DeploymentHandle,
                 settings: ApiSettings, on_demand: tuple[str, ...] = ()) -> None:
        self.enricher, self.builder, self.judge = enricher, builder, judge
        self.settings = settings
        self.on_demand = on_demand  # deployments that start on their first request

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.settings, self)

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            return await method.remote(*args)
        except BackPressureError as exc:
            raise ApiError(503, f"judges overloaded ({exc}); retry later", retry_after_s=1.0) from None
        except (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError,
                RequestCancelledError) as exc:
            raise ApiError(503, f"a judges replica is unavailable ({type(exc).__name__}); it is being restarted, "
                                "retry", retry_after_s=1.0) from None
        except RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, (UserError, EngineError)):
                raise cause from None
            raise ApiError(500, f"{type(cause).__name__}: {cause}") from None

    async def enrich(self, modality: str, label: str, dataset: str, n: int, seed: int | None) -> list[str]:
        return await self._call(self.enricher.enrich, modality, label, dataset, n, seed)

    async def checklist(self, modality: str, label: str, dataset: str, k: int) -> list[dict]:
        return await self._call(self.builder.build, modality, label, dataset, k)

    async def p_yes(self, images: list[Image.Image], questions: list[str]) -> list[float]:
        return await self._call(self.judge.p_yes, images, questions)

    async def generate(self, messages: list[dict], kwargs: dict) -> Any:
        return await self._call(self.judge.generate, messages, kwargs)

    async def health(self) -> dict:
        """Each deployment's model; deployments that start on demand are not asked (it would start them)."""
        names = {"PromptEnricher": self.enricher, "ChecklistBuilder": self.builder, "ChecklistJudge": self.judge}
        asked = {n: h for n, h in names.items() if n not in self.on_demand}
        try:
            models = await asyncio.wait_for(asyncio.gather(*(h.model_id.remote() for h in asked.values())), 10.0)
        except Exception as exc:  # any deployment not answering makes the app unhealthy
            raise ApiError(503, f"a deployment does not answer ({type(_cause(exc)).__name__}); retry") from None
        out = {name: {"model": m} for name, m in zip(asked, models, strict=True)}
        return {name: out.get(name, {"on_demand": True}) for name in names}


# ---------------------------------------------------------------- building the application
def served_model_name(model: str) -> str:
    """Name under which the judge's model is served: a local folder's name, else the id as given."""
    return Path(model).name if os.path.isdir(model) else model


def _check_model(engine: DictConfig) -> None:
    model = str(engine.model)
    local = model.startswith(("/", ".", "~"))  # hub ids look like org/name
    if engine.kind in ("transformers", "vllm") and local and not os.path.isdir(os.path.expanduser(model)):
        raise UserError(f"judge model folder {model!r} not found (judges.engine.model); build the tiny world with "
                        "`python -m craft_ray.bootstrap` or set judges.engine.model to a folder or hub id")


def application(cfg: DictConfig) -> serve.Application:
    """The judges app of a resolved experiment config (``judges.*``, ``data.dataset``, ``knowledge.path``)."""
    j = cfg.judges
    _check_model(j.engine)
    engine = OmegaConf.to_container(j.engine, resolve=True)
    token = os.environ.get(j.token_env, "")
    settings = ApiSettings(
        model=served_model_name(str(j.engine.model)),
        limits=Limits(int(j.max_request_bytes), int(j.max_image_pixels), int(j.max_images)),
        token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,  # the token itself stays here
        dataset=str(cfg.data.dataset),
        knowledge_path=cfg.knowledge.path,
        default_max_tokens=int(j.engine.max_new_tokens),
    )
    actor = {"num_cpus": float(j.replica_cpus), "num_gpus": float(j.replica_gpus),
             "runtime_env": {"env_vars": REPLICA_ENV}}
    common = {"num_replicas": int(j.num_replicas), "ray_actor_options": actor,
              "max_ongoing_requests": int(j.max_ongoing_requests), "max_queued_requests": int(j.max_queued_requests),
              "health_check_period_s": 2.0, "health_check_timeout_s": 30.0}
    generators = common
    if j.generators_on_demand:  # from zero replicas; Serve starts one for the first request it queues
        generators = {k: v for k, v in common.items() if k != "num_replicas"}
        generators["autoscaling_config"] = {"min_replicas": 0, "initial_replicas": 0,
                                            "max_replicas": max(1, int(j.num_replicas)),
                                            "downscale_to_zero_delay_s": float(j.generators_idle_s)}
    enricher = PromptEnricher.options(**generators).bind(engine)
    builder = ChecklistBuilder.options(**generators).bind(engine)
    judge = ChecklistJudge.options(
        **common, user_config={"max_batch_size": int(j.max_batch_size),
                               "batch_wait_timeout_s": float(j.batch_wait_timeout_s)}
    ).bind(engine)
    ingress_actor = {**actor, "num_gpus": 0.0}  # the ingress never runs a model
    return JudgesIngress.options(**{**common, "ray_actor_options": ingress_actor}).bind(
        enricher, builder, judge, settings, on_demand=GENERATORS if j.generators_on_demand else ())


def args_to_overrides(args: dict) -> tuple[str | None, list[str]]:
    """Serve builder args -> (config file, dotlist overrides): ``{config: FILE, judges: {port: 8001}, ...}``."""
    rest = dict(args or {})
    config_file = rest.pop("config", None)
    extra = rest.pop("overrides", None) or []
    if not isinstance(extra, list):
        raise UserError(f"builder arg 'overrides' must be a list of key=value strings, got {extra!r}")
    flat: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat.append(f"{prefix[:-1]}={json.dumps(node)}")

    walk(rest, "")
    return config_file, flat + [str(o) for o in extra]


def build_app(args: dict) -> serve.Application:
    """Serve builder for ``serve run`` / Serve config files: args are a config file and/or config values."""
    from craft_ray.config import load_config

    config_file, overrides = args_to_overrides(args)
    return application(load_config(config_file, overrides))


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Block until GET {url}/v1/health answers 200 (the app is up), else UserError."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/v1/health", timeout=10.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise UserError(f"judges at {url} not healthy after {timeout_s:.0f} s ({last})")
