"""LLM engines: transformers on the tiny judge, openai against a real local HTTP server, vllm's install error."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

from craft_ray.config import load_config
from craft_ray.errors import UserError
from craft_ray.models import json_constrained as jc
from craft_ray.models.engines import (
    EngineError,
    OpenAIEngine,
    TransformersEngine,
    VLLMEngine,
    chat_response,
    check_messages,
    decode_data_url,
    image_to_data_url,
    make_engine,
    p_yes_from_top_logprobs,
    parse_chat_request,
    vllm_tokens,
    yes_no_messages,
)
from craft_ray.models.tiny_judge import fit_yes_no, make_tiny_judge, make_tiny_text_lm, yes_no_loss

CHECKLIST_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {"$ref": "#/$defs/Item"},
        }
    },
    "required": ["items"],
    "additionalProperties": False,
    "$defs": {
        "Item": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "minLength": 1, "maxLength": 8},
                "question": {"type": "string"},
                "weight": {"type": "number"},
                "kind": {"enum": ["shape", "colour"]},
                "parent": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["id", "question", "kind"],
        }
    },
}
PROMPTS_SCHEMA = {
    "type": "object",
    "properties": {"prompts": {"type": "array", "items": {"type": "string"}}, "n": {"type": "integer"}},
    "required": ["prompts", "n"],
}
# Question-dependent answers the tiny judge can learn in a few steps.
TRAIN_QUESTIONS = [("Is the heart enlarged?", True), ("Is there a lung nodule?", False),
                   ("Is the lesion border irregular?", True), ("Are there white gland lumens?", False)]


def _image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return make_tiny_judge(tmp_path_factory.mktemp("judge"), seed=0)


@pytest.fixture(scope="module")
def engine(judge_dir):
    torch.manual_seed(0)
    eng = TransformersEngine(str(judge_dir), device="cpu", dtype="float32", max_new_tokens=96, batch_size=4)
    images = [_image(i) for i in range(8)]
    pairs = [TRAIN_QUESTIONS[i % 4] for i in range(8)]
    eng.train_losses = fit_yes_no(eng, images, [q for q, _ in pairs], [a for _, a in pairs],
                                  steps=40, lr=1e-2, batch_size=8)
    return eng


class _Server:
    """A real /v1/chat/completions HTTP server on 127.0.0.1 backed by an in-process engine."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.requests = 0
        self.fail_next = 0  # answer HTTP 500 to this many requests
        self.delay_next = 0  # sleep delay_s before answering this many requests
        self.delay_s = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Connection", "close")  # one request per thread: close() can join them
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                self.close_connection = True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    fail, delay = outer.fail_next > 0, outer.delay_next > 0
                    outer.fail_next -= fail
                    outer.delay_next -= delay
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if fail:
                    return self._send(500, {"error": {"message": "injected failure"}})
                if delay:
                    time.sleep(outer.delay_s)
                try:
                    messages, kwargs = parse_chat_request(body, default_max_tokens=64)
                    with outer.lock:
                        completion = outer.engine.generate(messages, **kwargs)
                except UserError as exc:
                    return self._send(400, {"error": {"message": str(exc)}})
                self._send(200, chat_response(completion, body["model"], logprobs=kwargs["logprobs"]))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Non-daemon handler threads are joined by server_close(), so no request (e.g. the one whose client
        # timed out) is still running the model when the interpreter exits.
        self.httpd.daemon_threads = False
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(engine):
    srv = _Server(engine)
    yield srv
    srv.close()


def _client(server: _Server, **kwargs) -> OpenAIEngine:
    opts = {"timeout_s": 30.0, "max_retries": 2, "max_new_tokens": 96} | kwargs
    return OpenAIEngine("tiny-judge", base_url=server.base_url, **opts)


# ---------------------------------------------------------------- transformers engine
def test_training_moves_p_yes_towards_the_answers(engine):
    losses = engine.train_losses
    assert losses[-1] < 0.2 * losses[0], losses
    images = [_image(100 + i) for i in range(4)]  # unseen images: the answer depends on the question
    p = engine.p_yes(images, [q for q, _ in TRAIN_QUESTIONS])
    for value, (_, answer) in zip(p, TRAIN_QUESTIONS, strict=True):
        assert (value > 0.9) if answer else (value < 0.1), p


def test_p_yes_batched_equals_one_by_one(engine):
    images = [_image(i, size=48 + 8 * i) for i in range(6)]  # sizes differ: the processor resizes
    questions = [q for q, _ in TRAIN_QUESTIONS] + ["Is the image a chest x-ray?", "Is there anything at all?"]
    batched = engine.p_yes(images, questions)  # batch_size=4: two micro-batches, with padding
    single = [engine.p_yes([img], [q])[0] for img, q in zip(images, questions, strict=True)]
    assert len(batched) == 6 and all(0.0 <= p <= 1.0 for p in batched)
    assert max(abs(a - b) for a, b in zip(batched, single, strict=True)) < 1e-5
    assert engine.p_yes(images, questions) == batched  # deterministic


def test_yes_no_loss_is_differentiable_and_matches_the_read_out(engine):
    img, (question, answer) = _image(7), TRAIN_QUESTIONS[0]
    loss = yes_no_loss(engine, [img], [question], [answer])
    assert loss.requires_grad and loss.ndim == 0
    logp = engine.next_token_logprobs([img], [question])
    assert math.isclose(loss.item(), -logp[0, engine.tokenizer.encode(" yes", add_special_tokens=False)[0]].item(),
                        rel_tol=1e-5)
    engine.model.zero_grad()


@pytest.mark.parametrize("schema", [CHECKLIST_SCHEMA, PROMPTS_SCHEMA], ids=["checklist", "prompts"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_json_schema_is_always_valid(engine, schema, temperature):
    messages = [{"role": "system", "content": "You write clinical checklists as JSON."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_data_url(_image(3))}},
                                             {"type": "text", "text": "List what to check in this image."}]}]
    for seed in range(3):
        torch.manual_seed(seed)
        out = engine.generate(messages, max_tokens=80, temperature=temperature, json_schema=schema)
        jsonschema.validate(json.loads(out.text), schema)
        assert out.finish_reason == "stop"
        assert out.usage.completion_tokens <= 80 and out.usage.prompt_tokens > 64  # 64 image tokens


def test_generate_tight_budget_still_valid_and_too_small_refused(engine):
    shortest = jc.min_completion(jc.JsonGrammar(PROMPTS_SCHEMA).initial)
    assert shortest == '{"prompts":[],"n":0}'
    msgs = [{"role": "user", "content": "Give prompts."}]
    out = engine.generate(msgs, max_tokens=len(shortest) + 1, json_schema=PROMPTS_SCHEMA)
    jsonschema.validate(json.loads(out.text), PROMPTS_SCHEMA)
    assert out.finish_reason == "stop" and out.usage.completion_tokens <= len(shortest) + 1
    with pytest.raises(UserError, match="max_tokens=10 is too small"):
        engine.generate(msgs, max_tokens=10, json_schema=PROMPTS_SCHEMA)


def test_generate_logprobs_and_plain_text(engine):
    out = engine.generate([{"role": "user", "content": "Hello"}], max_tokens=5, logprobs=True, top_logprobs=3)
    assert out.usage.completion_tokens == len(out.tokens) + (out.finish_reason == "stop")
    for tok in out.tokens:
        assert len(tok.top_logprobs) == 3 and tok.logprob <= tok.top_logprobs[0][1] + 1e-6
        assert tok.top_logprobs[0][1] >= tok.top_logprobs[1][1] >= tok.top_logprobs[2][1]
    assert out.text == "".join(t.token for t in out.tokens)


def test_text_only_lm(tmp_path):
    lm = TransformersEngine(str(make_tiny_text_lm(tmp_path / "lm")), device="cpu", dtype="float32")
    assert not lm.multimodal
    out = lm.generate([{"role": "user", "content": "Enrich: a chest x-ray"}], max_tokens=60,
                      json_schema=PROMPTS_SCHEMA)
    jsonschema.validate(json.loads(out.text), PROMPTS_SCHEMA)
    with pytest.raises(UserError, match="text-only"):
        lm.p_yes([_image(0)], ["Is it?"])
    with pytest.raises(UserError, match="text-only"):
        lm.generate(yes_no_messages(_image(0), "Is it?"))


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load judge model"):
        TransformersEngine(str(tmp_path / "nope"), device="cpu")


def test_make_engine_from_config(judge_dir):
    cfg = load_config(overrides=[f"judges.engine.model={judge_dir}", "judges.engine.device=cpu"])
    eng = make_engine(cfg.judges.engine)
    assert isinstance(eng, TransformersEngine) and eng.model_id == str(judge_dir)
    cfg.judges.engine.kind = "openai"
    with pytest.raises(UserError, match="base_url"):
        make_engine(cfg.judges.engine)


# ---------------------------------------------------------------- messages, images, yes/no grouping
def test_data_url_round_trip_and_refusals(tmp_path):
    img = _image(5)
    back = decode_data_url(image_to_data_url(img))
    assert np.array_equal(np.asarray(back), np.asarray(img))
    real_file = tmp_path / "x.png"
    img.save(real_file)
    for url in (str(real_file), f"file://{real_file}", "http://127.0.0.1:1/x.png", "https://example.com/x.png"):
        with pytest.raises(UserError, match="not a data URL"):
            decode_data_url(url)
    with pytest.raises(UserError, match="invalid base64"):
        decode_data_url("data:image/png;base64,@@@")
    with pytest.raises(UserError, match="readable image"):
        decode_data_url("data:image/png;base64,aGVsbG8=")
    with pytest.raises(UserError, match="header"):
        decode_data_url("data:text/plain;base64,aGVsbG8=")


def test_check_messages_refuses_bad_shapes():
    with pytest.raises(UserError, match="role 'tool'"):
        check_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(UserError, match="not a data URL"):
        check_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])
    with pytest.raises(UserError, match=r"content\[0\]"):
        check_messages([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(UserError, match="non-empty list"):
        check_messages([])


def test_p_yes_from_top_logprobs_groups_variants():
    alts = [(" Yes", math.log(0.5)), ("yes", math.log(0.1)), ("No", math.log(0.2)), ("maybe", math.log(0.1))]
    assert p_yes_from_top_logprobs(alts) == pytest.approx(0.75)
    assert p_yes_from_top_logprobs([("\u2581no", 0.0)]) == 0.0
    with pytest.raises(EngineError, match="neither 'yes' nor 'no'"):
        p_yes_from_top_logprobs([("maybe", -0.1), ("perhaps", -2.0)])


def test_parse_chat_request_validation():
    msgs = [{"role": "user", "content": "hi"}]
    _, kwargs = parse_chat_request({"messages": msgs, "max_tokens": 7, "logprobs": True, "top_logprobs": 5}, 64)
    assert kwargs == {"max_tokens": 7, "temperature": 0.0, "json_schema": None, "logprobs": True, "top_logprobs": 5}
    with pytest.raises(UserError, match="top_logprobs"):
        parse_chat_request({"messages": msgs, "top_logprobs": 50}, 64)
    with pytest.raises(UserError, match="json_object"):
        parse_chat_request({"messages": msgs, "response_format": {"type": "json_object"}}, 64)


# ---------------------------------------------------------------- JSON grammar
def test_grammar_accepts_valid_and_rejects_invalid_documents():
    g = jc.JsonGrammar(CHECKLIST_SCHEMA)
    ok = ['{"items": [{"id":"c1","question":"Is it \\"big\\"?\\u00e9","weight":-1.25,"kind":"shape","parent":null}]}',
          ' {"items":[{"id":"a","question":"","kind":"colour"},{"id":"b","question":"q","kind":"shape","parent":"a"}]}']
    for doc in ok:
        state = g.feed(g.initial, doc)
        assert state is not None and g.is_complete(state), doc
        jsonschema.validate(json.loads(doc), CHECKLIST_SCHEMA)
    bad = ['{"items":[]}',  # minItems
           '{"items":[{"id":"","question":"","kind":"shape"}]}',  # minLength
           '{"items":[{"id":"123456789","question":"","kind":"shape"}]}',  # maxLength
           '{"items":[{"question":"","id":"a","kind":"shape"}]}',  # order / required id first
           '{"items":[{"id":"a","question":"","kind":"size"}]}',  # enum
           '{"items":[{"id":"a","question":"","kind":"shape","weight":01}]}',  # leading zero
           '{"items":[{"id":"a","question":"","kind":"shape"}],"extra":1}',  # unknown key
           '{"items" :[]}']  # whitespace before colon
    for doc in bad:
        state = g.feed(g.initial, doc)
        assert state is None or not g.is_complete(state), doc


def test_grammar_random_walks_always_finish_valid_within_budget():
    g = jc.JsonGrammar(CHECKLIST_SCHEMA)
    rng = random.Random(0)
    alphabet = list('{}[],:"0123456789.- \\' + string.ascii_lowercase)  # every char a completion may need
    for _ in range(30):
        state, text, budget = g.initial, "", rng.randint(60, 160)
        assert len(g.min_completion(state)) <= budget
        while True:
            options = [(c, s) for c in alphabet if (s := g.feed(state, c)) is not None
                       and len(g.min_completion(s)) <= budget - len(text) - 1]
            if not options or (g.is_complete(state) and rng.random() < 0.3):
                break
            c, state = rng.choice(options)
            text += c
        assert g.is_complete(state), text
        jsonschema.validate(json.loads(text), CHECKLIST_SCHEMA)


@pytest.mark.parametrize("schema, word", [
    ({"type": "string", "pattern": "^a$"}, "pattern"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}}, "recursive"),
    ({"anyOf": [{"type": "string"}, {"enum": ["x"]}]}, "start with different characters"),
    ({"type": "array"}, "needs 'items'"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "required"),
])
def test_grammar_refuses_what_it_cannot_enforce(schema, word):
    with pytest.raises(UserError, match=word):
        jc.JsonGrammar(schema)


# ---------------------------------------------------------------- openai engine against a real HTTP server
def test_openai_engine_p_yes_matches_in_process(engine, server):
    client = _client(server)
    images = [_image(200 + i) for i in range(4)]
    questions = [q for q, _ in TRAIN_QUESTIONS]
    served = client.p_yes(images, questions)
    # Same read-out from the same top-20 alternatives, computed in process: exact.
    local_top = [p_yes_from_top_logprobs(engine.generate(yes_no_messages(img, q), max_tokens=1, logprobs=True,
                                                         top_logprobs=20).tokens[0].top_logprobs)
                 for img, q in zip(images, questions, strict=True)]
    assert served == pytest.approx(local_top, abs=1e-6)
    # The full-vocabulary P(yes): the trained judge puts its mass on yes/no, so top-20 sees nearly all.
    assert served == pytest.approx(engine.p_yes(images, questions), abs=1e-3)
    assert [p > 0.5 for p in served] == [a for _, a in TRAIN_QUESTIONS]


def test_openai_engine_json_schema_and_logprobs_match_in_process(engine, server):
    client = _client(server)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_data_url(_image(9))}},
                                             {"type": "text", "text": "Checklist as JSON."}]}]
    served = client.generate(messages, max_tokens=80, json_schema=CHECKLIST_SCHEMA, logprobs=True, top_logprobs=2)
    local = engine.generate(messages, max_tokens=80, json_schema=CHECKLIST_SCHEMA, logprobs=True, top_logprobs=2)
    assert served.text == local.text and served.finish_reason == "stop"
    jsonschema.validate(json.loads(served.text), CHECKLIST_SCHEMA)
    assert [t.token for t in served.tokens] == [t.token for t in local.tokens]
    assert [t.logprob for t in served.tokens] == pytest.approx([t.logprob for t in local.tokens], abs=1e-6)
    assert served.usage == local.usage


def test_openai_engine_retries_after_a_server_error(server):
    before = server.requests
    server.fail_next = 1
    out = _client(server, max_retries=2).generate([{"role": "user", "content": "hi"}], max_tokens=3)
    assert server.requests - before == 2 and out.usage.completion_tokens >= 1
    server.fail_next = 1
    with pytest.raises(EngineError, match="HTTP 500"):
        _client(server, max_retries=0).generate([{"role": "user", "content": "hi"}], max_tokens=3)


def test_openai_engine_retries_after_a_timeout(server):
    before = server.requests
    server.delay_s, server.delay_next = 2.0, 1
    t0 = time.monotonic()
    out = _client(server, timeout_s=0.5, max_retries=1).generate([{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.finish_reason in ("stop", "length")
    assert server.requests - before == 2 and time.monotonic() - t0 < 10
    server.delay_next = 1
    with pytest.raises(UserError, match="cannot reach"):
        _client(server, timeout_s=0.5, max_retries=0).generate([{"role": "user", "content": "hi"}], max_tokens=3)


def test_openai_engine_server_rejections(server):
    client = _client(server, max_retries=0)
    with pytest.raises(UserError, match="not a data URL"):  # refused before anything is sent
        client.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])
    with pytest.raises(EngineError, match="HTTP 400"):  # the server's own validation
        client.generate([{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=21)
    with pytest.raises(UserError, match="cannot reach"):
        OpenAIEngine("m", base_url="http://127.0.0.1:9/v1", timeout_s=0.5, max_retries=0).generate(
            [{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- vllm engine (no GPU here)
def test_vllm_engine_without_vllm_says_how_to_install():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; this test checks the message shown when it is not")
    with pytest.raises(UserError, match=r"pip install 'craft_ray\[vllm\]'"):
        VLLMEngine("some/model")
    cfg = load_config(overrides=["judges.engine.kind=vllm"])
    with pytest.raises(UserError, match="GPU"):
        make_engine(cfg.judges.engine)


def test_vllm_token_logprobs_feed_the_shared_read_out():
    # vLLM's CompletionOutput: token_ids and, per position, {token_id: Logprob(logprob, rank, decoded_token)}.
    lp = SimpleNamespace
    out = SimpleNamespace(token_ids=[7], logprobs=[{
        7: lp(logprob=math.log(0.6), rank=1, decoded_token=" Yes"),
        3: lp(logprob=math.log(0.3), rank=2, decoded_token=" No"),
        9: lp(logprob=math.log(0.1), rank=3, decoded_token="Maybe"),
    }])
    tokens = vllm_tokens(out)
    assert tokens[0].token == " Yes" and [t for t, _ in tokens[0].top_logprobs] == [" Yes", " No", "Maybe"]
    assert p_yes_from_top_logprobs(tokens[0].top_logprobs) == pytest.approx(2 / 3)
