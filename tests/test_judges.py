"""The judges app on a real local Ray + Serve, over real HTTP on 127.0.0.1, with the tiny judge.

One app is deployed for the module; the tests that need other settings (unbatched, tiny queues) redeploy
it through ``Judges.deploy``, which replaces the replicas, so they come last. Reference values come from
the same engine run in this process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from craft_ray import knowledge as knowledge_cli
from craft_ray.cas import checklist_judge, judge_checklist
from craft_ray.config import load_config
from craft_ray.errors import UserError
from craft_ray.judges.app import application, args_to_overrides, wait_healthy
from craft_ray.judges.client import HandleClient, JudgesClient, connect
from craft_ray.knowledge import load_shipped
from craft_ray.models.engines import TransformersEngine, image_to_data_url
from craft_ray.models.tiny_judge import make_tiny_judge

TOKEN_ENV = "CRAFT_TEST_JUDGES_TOKEN"
TOKEN = "s3cret-token"
APP = "craft_judges"
ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Judges:
    """The deployed app: its URL, config and a way to redeploy it with other options."""

    def __init__(self, judge_dir: Path, port: int) -> None:
        self.judge_dir = judge_dir
        self.url = f"http://127.0.0.1:{port}"
        self.base = [f"judges.engine.model={judge_dir}", f"judges.port={port}", f"judges.token_env={TOKEN_ENV}",
                     "judges.engine.device=cpu", "judges.engine.dtype=float32", "judges.engine.max_new_tokens=24",
                     "judges.max_images=8", "judges.max_request_bytes=400000", "judges.max_image_pixels=65536",
                     "judges.replica_cpus=0.1", "judges.generators_on_demand=false"]
        self.current: dict | None = None
        self.cfg = load_config(None, self.base)

    def deploy(self, **options: object) -> None:
        """(Re)deploy with ``judges.<key>=value`` options on top of the base ones; no-op when unchanged."""
        from ray import serve

        if options == self.current:
            return
        self.cfg = load_config(None, self.base + [f"judges.{k}={v}" for k, v in options.items()])
        serve.run(application(self.cfg), name=APP, route_prefix="/")
        wait_healthy(self.url, timeout_s=60)
        self.current = dict(options)

    def client(self, **kwargs: object) -> JudgesClient:
        return JudgesClient(self.url, **({"token": TOKEN, "timeout_s": 60.0, "max_images": 8} | kwargs))

    def judge_stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("ChecklistJudge", app_name=APP).stats.remote().result(timeout_s=30)


@pytest.fixture(scope="module")
def judges(ray_local, tmp_path_factory):
    from ray import serve

    judge_dir = make_tiny_judge(tmp_path_factory.mktemp("tiny") / "judge", seed=0)
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKEN_ENV, TOKEN)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = Judges(judge_dir, port)
        try:
            app.deploy()
            yield app
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def engine(judges):
    return TransformersEngine(str(judges.judge_dir), device="cpu", dtype="float32", batch_size=16)


@pytest.fixture(scope="module")
def http(judges):
    with httpx.Client(base_url=judges.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def _reference(engine: TransformersEngine, images: list[Image.Image], questions: list[str]) -> np.ndarray:
    """P(yes) [B, K] of every image x question, computed in this process."""
    flat = engine.p_yes([img for img in images for _ in questions], [q for _ in images for q in questions])
    return np.asarray(flat).reshape(len(images), len(questions))


# ---------------------------------------------------------------- endpoints
def test_health_and_models(judges, http):
    health = httpx.get(f"{judges.url}/v1/health", timeout=30)  # no token needed: load balancers probe it
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["model"] == "judge"
    assert set(body["deployments"]) == {"PromptEnricher", "ChecklistBuilder", "ChecklistJudge"}
    assert all(d["model"] == str(judges.judge_dir) for d in body["deployments"].values())
    models = http.get("/v1/models")
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ["judge"]
    assert judges.client().models() == ["judge"]


def test_generators_on_demand_start_with_their_first_request(judges, http):
    """judges.generators_on_demand (the tiny profile's): the app starts without enricher and builder
    replicas, health does not wake them, and the first request starts one and is answered."""
    from ray import serve

    def replicas(name: str) -> int:
        status = serve.status().applications[APP].deployments[name]
        return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))

    try:
        judges.deploy(generators_on_demand=True)
        assert replicas("PromptEnricher") == replicas("ChecklistBuilder") == 0 and replicas("ChecklistJudge") == 1
        body = http.get("/v1/health").json()["deployments"]
        assert body["PromptEnricher"] == body["ChecklistBuilder"] == {"on_demand": True}
        assert body["ChecklistJudge"] == {"model": str(judges.judge_dir)}
        assert replicas("PromptEnricher") == 0  # the health check did not start one
        r = http.post("/v1/enrich", json={"modality": "cxr", "label": "cardiomegaly", "n": 2})
        assert r.status_code == 200 and len(r.json()["prompts"]) == 2
        assert replicas("PromptEnricher") == 1 and replicas("ChecklistBuilder") == 0
    finally:
        judges.deploy()


def test_enrich_returns_n_schema_valid_prompts(judges, http):
    r = http.post("/v1/enrich", json={"modality": "cxr", "label": "cardiomegaly", "n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["modality"], body["label"], body["dataset"], body["model"]) == ("cxr", "cardiomegaly", "phantom",
                                                                                 "judge")
    # The untrained tiny judge writes meaningless text; the structure is what the schema guarantees.
    assert len(body["prompts"]) == 3 and all(isinstance(p, str) and 0 < len(p) <= 240 for p in body["prompts"])
    assert judges.client().enrich("cxr", "cardiomegaly", 3) == body["prompts"]  # greedy: deterministic


def test_checklist_items_have_the_knowledge_shape(judges, http):
    r = http.post("/v1/checklist", json={"modality": "derm", "label": "melanoma", "k": 3})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 3
    ids = [it["id"] for it in items]
    assert len(set(ids)) == 3
    for it in items:
        assert set(it) == {"id", "question", "present", "absent", "parent"}
        assert it["id"][0].isalpha() and all(c.islower() or c.isdigit() or c == "_" for c in it["id"])
        assert it["question"].endswith("?")
        assert it["parent"] is None or (it["parent"] in ids and it["parent"] != it["id"])


def test_judge_with_knowledge_items_matches_the_engine(judges, http, engine):
    jpeg = _b64(_image(2, size=48), "JPEG")  # a lossy format: the reference decodes the very same bytes
    images = [_image(1), Image.open(io.BytesIO(base64.b64decode(jpeg))).convert("RGB")]
    r = http.post("/v1/judge", json={"modality": "cxr", "label": "cardiomegaly", "images": [_b64(images[0]), jpeg]})
    assert r.status_code == 200, r.text
    body = r.json()
    know = load_shipped("cxr", "phantom")
    items = know.checklist("cardiomegaly")
    assert body["knowledge"] == know.version
    ref = _reference(engine, images, [it.question for it in items])
    got = np.array([[s["p_yes"] for s in res["items"]] for res in body["results"]])
    assert [s["id"] for s in body["results"][0]["items"]] == [it.id for it in items]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    parents = {it.id: it.parent for it in items}
    ids = [it.id for it in items]
    np.testing.assert_allclose([res["score"] for res in body["results"]], ref.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose([res["gated_score"] for res in body["results"]],
                               checklist_judge(ref, ids, parents, gating=True), atol=1e-5)


def test_judge_with_request_items_and_gating(judges, engine):
    items = [{"id": "a", "question": "Is the thorax visible?"},
             {"id": "b", "question": "Is the heart enlarged?", "parent": "a"},
             {"id": "c", "question": "Are the lungs clear?", "parent": "b"}]
    images = [_image(3), _image(4)]
    results = judges.client().judge("cxr", "cardiomegaly", images, items=items)
    ref = _reference(engine, images, [it["question"] for it in items])
    got = np.array([[s["p_yes"] for s in res["items"]] for res in results])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    gated = checklist_judge(ref, ["a", "b", "c"], {"a": None, "b": "a", "c": "b"}, gating=True)
    np.testing.assert_allclose([res["gated_score"] for res in results], gated, atol=1e-5)


def test_client_p_yes_plugs_into_cas_and_handle_client_agrees(judges, engine):
    know = load_shipped("fundus", "phantom")
    images = [_image(5), _image(6), _image(7)]
    twin, p, ids = judge_checklist(judges.client(), images, "glaucoma", know, gating=True)
    ref = _reference(engine, images, [it.question for it in know.checklist("glaucoma")])
    np.testing.assert_allclose(p, ref, atol=1e-5)
    assert ids == [it.id for it in know.checklist("glaucoma")]
    handle = connect(judges.cfg)  # this process is on the cluster running the app: no HTTP hop
    assert isinstance(handle, HandleClient)
    _, p_handle, _ = judge_checklist(handle, images, "glaucoma", know, gating=True)
    np.testing.assert_allclose(p_handle, ref, atol=1e-5)
    assert twin.shape == (3,)


def test_openai_client_chat_with_logprobs_and_json_schema(judges, engine):
    import openai

    client = openai.OpenAI(base_url=f"{judges.url}/v1", api_key=TOKEN, max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_to_data_url(_image(8))}},
        {"type": "text", "text": "Is the heart enlarged? Answer yes or no."}]}]
    out = client.chat.completions.create(model="judge", messages=messages, max_tokens=3, temperature=0,
                                         logprobs=True, top_logprobs=4)
    want = engine.generate(messages, max_tokens=3, logprobs=True, top_logprobs=4)
    choice = out.choices[0]
    assert choice.message.content == want.text
    assert [t.token for t in choice.logprobs.content] == [t.token for t in want.tokens]
    assert all(len(t.top_logprobs) == 4 for t in choice.logprobs.content)
    np.testing.assert_allclose([t.logprob for t in choice.logprobs.content], [t.logprob for t in want.tokens],
                               atol=1e-4)
    assert out.usage.completion_tokens == want.usage.completion_tokens

    schema = {"type": "object", "properties": {"finding": {"type": "string", "maxLength": 12},
                                               "present": {"type": "boolean"}},
              "required": ["finding", "present"], "additionalProperties": False}
    out = client.chat.completions.create(
        model="judge", messages=[{"role": "user", "content": "Describe the main finding as JSON."}], max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "finding", "schema": schema}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)

    with pytest.raises(openai.AuthenticationError, match="wrong bearer token"):
        openai.OpenAI(base_url=f"{judges.url}/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="judge", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)


def test_knowledge_build_over_http(judges, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRAFT_JUDGES_TOKEN", TOKEN)
    out = tmp_path / "histo_draft.yaml"
    try:
        knowledge_cli.main(["build", "--modality", "histo", "--out", str(out), "--url", judges.url, "--prompts", "8",
                            "--items", "4"])
        validated = True
    except UserError as exc:  # duplicate or blank texts from the untrained judge are reported, file kept
        assert str(exc).startswith(f"draft written to {out} but it does not validate yet; fix it by hand: ")
        validated = False
    data = yaml.safe_load(out.read_text())
    assert data["modality"] == "histo" and data["dataset"] == "phantom"
    assert data["version"].startswith("phantom-histo-draft-") and data["description"].startswith("DRAFT built by judge")
    assert list(data["labels"]) == ["normal", "tumor", "stroma"]
    for entry in data["labels"].values():
        assert 1 <= len(entry["prompts"]) <= 8 and len(entry["checklist"]) == 4
    if validated:
        assert "review it before use" in capsys.readouterr().out


# ---------------------------------------------------------------- security and bad input
def test_bad_requests_get_4xx_with_a_message(judges, http):
    ok_image = _b64(_image(9))
    big_image = _b64(_image(10, size=300))  # 90,000 pixels > judges.max_image_pixels=65536
    judge = {"modality": "cxr", "label": "nodule", "images": [ok_image]}
    cases = [
        # (method, path, json body or raw bytes, headers, status, message fragment)
        ("POST", "/v1/judge", judge, {"Authorization": ""}, 401, "missing bearer token"),
        ("POST", "/v1/judge", judge, {"Authorization": "Bearer wrong"}, 401, "wrong bearer token"),
        ("GET", "/v1/models", None, {"Authorization": "Basic abc"}, 401, "wrong bearer token"),
        ("POST", "/v1/judge", b"x" * 500_000, {}, 413, "exceeds the limit of 400000 bytes"),
        ("POST", "/v1/judge", judge | {"images": [big_image]}, {}, 413, "images[0] is 300x300 = 90000 pixels"),
        ("POST", "/v1/judge", judge | {"images": [ok_image] * 9}, {}, 413, "9 images in one request; the limit is 8"),
        ("POST", "/v1/judge", judge | {"images": ["not base64!"]}, {}, 400, "images[0] is not valid base64"),
        ("POST", "/v1/judge", judge | {"images": ["/etc/passwd"]}, {}, 400, "file paths and URLs are refused"),
        ("POST", "/v1/judge", judge | {"images": [base64.b64encode(b"GIF89a....").decode()]}, {}, 400,
         "images[0] is not a PNG or JPEG image"),
        ("POST", "/v1/judge", judge | {"images": ["data:text/plain;base64,aGk="]}, {}, 400,
         "must look like 'data:image/png;base64'"),
        ("POST", "/v1/judge", b'{"modality": "cxr",', {}, 400, "malformed JSON body"),
        ("POST", "/v1/judge", b"modality=cxr", {"Content-Type": "application/x-www-form-urlencoded"}, 400,
         "request body must be a JSON object sent with 'Content-Type: application/json'"),
        ("POST", "/v1/judge", {"modality": "cxr", "label": "nodule"}, {}, 422, "images: Field required"),
        ("POST", "/v1/judge", judge | {"modality": "ct"}, {}, 422,
         "unknown modality 'ct'; known: cxr, derm, fundus, histo"),
        ("POST", "/v1/judge", judge | {"label": "pneumonia"}, {}, 422,
         "unknown label 'pneumonia' for modality cxr (phantom); known: no_finding, cardiomegaly, pleural_effusion, "
         "nodule"),
        ("POST", "/v1/judge", judge | {"dataset": "mimic"}, {}, 422, "unknown dataset 'mimic' for modality cxr"),
        ("POST", "/v1/judge", judge | {"items": [{"id": "a", "question": "Q?", "parent": "z"}]}, {}, 422,
         "items[0].parent 'z' is not an item id"),
        ("POST", "/v1/enrich", {"modality": "cxr", "label": "nodule", "n": 0}, {}, 422,
         "n: Input should be greater than or equal to 1"),
        ("POST", "/v1/checklist", {"modality": "cxr", "label": "nodule", "k": 3, "path": "/etc"}, {}, 422,
         "path: Extra inputs are not permitted"),
        ("POST", "/v1/p_yes", {"images": [ok_image], "pairs": [{"image": 3, "question": "Q?"}]}, {}, 422,
         "pairs[0].image 3 is out of range"),
        ("POST", "/v1/chat/completions", {"model": "judge", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, {}, 400, "is not a data URL"),
        ("POST", "/v1/chat/completions", {"model": "judge", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + big_image}}]}]}, {}, 413,
         "= 90000 pixels"),
        ("POST", "/v1/chat/completions", {"model": "judge", "messages": []}, {}, 400, "messages must be a non-empty"),
        ("POST", "/v1/chat/completions", b"{nope", {}, 400, "malformed JSON body"),
        ("GET", "/v1/nothing", None, {}, 404, "no route GET /v1/nothing"),
    ]
    for method, path, body, headers, status, fragment in cases:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
        if isinstance(body, bytes):
            headers = {"Content-Type": "application/json"} | headers
        r = http.request(method, path, headers=headers, **kwargs)
        assert r.status_code == status, (path, fragment, r.status_code, r.text)
        error = r.json()["error"]
        assert fragment in error["message"], (fragment, error)
        assert error["code"] == status
    assert http.get("/v1/health").status_code == 200  # the server survived all of it


def test_chunked_body_over_the_limit_is_413(judges):
    def chunks():
        for _ in range(50):
            yield b" " * 10_000  # 500 kB without a Content-Length header

    r = httpx.post(f"{judges.url}/v1/judge", content=chunks(), timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 400000 bytes" in r.json()["error"]["message"]


def test_client_errors_name_the_problem(judges):
    with pytest.raises(UserError, match="HTTP 422: unknown label 'x' for modality derm"):
        judges.client().enrich("derm", "x", 2)
    with pytest.raises(UserError, match=r"HTTP 401: missing bearer token.*judges.token_env"):
        judges.client(token=None).models()
    with pytest.raises(UserError, match="cannot reach the judges at http://127.0.0.1:9 after 2 attempts"):
        JudgesClient("http://127.0.0.1:9", retries=1, backoff_s=0.01).health()


def test_serve_builder_args_and_missing_model(tmp_path):
    config, overrides = args_to_overrides({"config": "exp.yaml", "judges": {"port": 8001, "engine": {"kind": "openai"}},
                                           "overrides": ["data.dataset=chexpert"]})
    assert config == "exp.yaml"
    assert overrides == ["judges.port=8001", 'judges.engine.kind="openai"', "data.dataset=chexpert"]
    for name in ("judges.yaml", "judges-gpu.yaml", "llm-vllm.yaml"):
        spec = yaml.safe_load((ROOT / "deployments" / name).read_text())
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(spec)
        app = next(a for a in spec["applications"] if a["name"] == "craft_judges")
        assert app["import_path"] == "craft_ray.judges.app:build_app"
        load_config(*args_to_overrides(app["args"]))  # every key is a known config key
    with pytest.raises(UserError, match=r"judge model folder '/nonexistent/judge' not found"):
        application(load_config(None, ["judges.engine.model=/nonexistent/judge"]))


def test_serve_cli_refuses_a_missing_model_before_starting_ray():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run([sys.executable, "-m", "craft_ray.serve", "judges.engine.model=/nonexistent/judge"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error: judge model folder '/nonexistent/judge' not found")
    printed = subprocess.run([sys.executable, "-m", "craft_ray.serve", "judges.port=8123", "--print-config"],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["judges"]["port"] == 8123


# ---------------------------------------------------------------- batching, load, overload, failures
@pytest.mark.slow
def test_200_concurrent_judge_requests_are_all_answered_correctly(judges, engine):
    questions = [it.question for it in load_shipped("histo", "phantom").checklist("tumor")]
    images = [_image(1000 + i, size=32) for i in range(200)]
    ref = _reference(engine, images, questions)
    judges.deploy()
    client = judges.client(retries=0)  # no retries: every one of the 200 must succeed first time
    t0 = time.perf_counter()
    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(lambda img: client.judge("histo", "tumor", [img])[0], images))
    elapsed = time.perf_counter() - t0
    got = np.array([[s["p_yes"] for s in res["items"]] for res in results])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    print(f"200 concurrent judge requests in {elapsed:.1f} s")


@pytest.mark.slow
def test_killed_judge_replica_is_restarted_and_retries_hide_it(judges, engine):
    questions = [it.question for it in load_shipped("cxr", "phantom").checklist("nodule")]
    images = [_image(2000 + i, size=32) for i in range(48)]
    ref = _reference(engine, images, questions)
    judges.deploy()
    old_pid = judges.judge_stats()["pid"]
    client = judges.client(retries=12, backoff_s=0.5, max_backoff_s=4.0)
    done = threading.Event()
    finished: list[int] = []

    def one(i: int) -> dict:
        out = client.judge("cxr", "nodule", [images[i]])[0]
        finished.append(i)
        return out

    def killer() -> None:
        while len(finished) < 8 and not done.is_set():
            time.sleep(0.05)
        os.kill(old_pid, signal.SIGKILL)  # mid-load: requests are in flight on the replica

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(len(images))))
    finally:
        done.set()
        thread.join()
    got = np.array([[s["p_yes"] for s in res["items"]] for res in results])
    np.testing.assert_allclose(got, ref, atol=1e-5)  # no request lost, every answer right
    assert judges.judge_stats()["pid"] != old_pid  # Serve replaced the dead replica


@pytest.mark.slow
def test_batched_and_unbatched_judging_agree(judges, engine):
    know = load_shipped("derm", "phantom")
    questions = [it.question for it in know.checklist("melanoma")]
    images = [_image(100 + i) for i in range(12)]
    ref = _reference(engine, images, questions)

    def run_all() -> np.ndarray:
        client = judges.client()
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda img: client.judge("derm", "melanoma", [img])[0], images))
        return np.array([[s["p_yes"] for s in res["items"]] for res in results])

    judges.deploy(max_batch_size=16)  # smaller than the tiny profile's 64: a 8-image request spans batches
    before = judges.judge_stats()
    batched = run_all()
    after = judges.judge_stats()
    pairs, batches = after["pairs"] - before["pairs"], after["batches"] - before["batches"]
    assert pairs == 12 * len(questions)
    assert pairs / batches > len(questions)  # pairs of different requests shared forward passes
    many = judges.client().judge("derm", "melanoma", images)  # one request, more pairs than max_batch_size
    assert len(images) * len(questions) > 16 and judges.judge_stats()["largest_batch"] <= 16
    np.testing.assert_allclose(np.array([[s["p_yes"] for s in res["items"]] for res in many]), ref, atol=1e-5)
    judges.deploy(max_batch_size=1)  # replaces the replicas: imperative serve.run redeploys in full
    base = judges.judge_stats()
    unbatched = run_all()
    stats = judges.judge_stats()
    assert stats["pairs"] - base["pairs"] == stats["batches"] - base["batches"]  # one pair per batch
    np.testing.assert_allclose(batched, ref, atol=1e-5)
    np.testing.assert_allclose(unbatched, ref, atol=1e-5)
    np.testing.assert_allclose(batched, unbatched, atol=1e-5)


@pytest.mark.slow
def test_overload_answers_503_instead_of_hanging(judges):
    judges.deploy(max_ongoing_requests=1, max_queued_requests=1)
    body = {"modality": "cxr", "label": "nodule", "images": [_b64(_image(11))]}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{judges.url}/v1/judge", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(post, range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) >= 10 and codes.count(200) >= 1, codes
    assert time.perf_counter() - t0 < 30


def test_the_app_and_the_engines_module_import_without_torch_or_transformers():
    """The ingress replica and the training driver import the app: only the model replicas load torch and
    transformers (through models/engines_hf.py, which engines.TransformersEngine reaches lazily)."""
    code = ("import sys; import craft_ray.judges.app, craft_ray.judges.client, craft_ray.models.engines as e; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); "
            "e.TransformersEngine; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_connect_or_none_gives_none_and_says_why_when_the_judges_cannot_be_reached(monkeypatch, capsys):
    """Training, periodic and final evaluations share it: a judge that cannot be connected is left out."""
    from craft_ray.judges import client

    cfg = load_config(None, [])
    # Other tests of this module leave the judges app running on their Ray cluster: pretend it is not there.
    monkeypatch.setattr(client, "serve_app_running", lambda name: False)
    http_client = client.connect_or_none(cfg)
    assert isinstance(http_client, JudgesClient)  # no app on Ray: HTTP to judges.host:port
    http_client.close()

    def refuse(cfg, **kwargs):
        raise UserError("no judges here")

    monkeypatch.setattr(client, "connect", refuse)
    assert client.connect_or_none(cfg) is None
    assert "checklist judge unavailable: UserError: no judges here" in capsys.readouterr().out
