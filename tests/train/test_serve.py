"""``mmtune serve`` through a real HTTP client (httpx) against a server on 127.0.0.1: mixed-adapter
answers equal single-adapter greedy generation, bad requests get 4xx and the server keeps serving,
overload answers 429, API keys, bind refusal, run-time registration confined to the adapter folders."""

import asyncio
import json

import httpx
import pytest
from serve_helpers import greedy_alone, make_served_world

from train.serving.app import ServeLimits
from train.serving.server import ServeOptions, ServerHandle, build_state

LIMITS = ServeLimits(max_body_bytes=4096, max_tokens=24, max_prompt_tokens=40, max_concurrent=8)


def start(world, **options) -> ServerHandle:
    limits = options.pop("limits", LIMITS)
    state = build_state(ServeOptions(model=str(world["model"]), adapter_dirs=[str(world["adapters"])],
                                     base_name="base", **options), limits)
    return ServerHandle(state, "127.0.0.1", 0).start()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_served_world(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(world):
    handle = start(world)
    yield handle
    handle.stop()


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=60, **kwargs)


def test_models_lists_base_and_adapters(server):
    answer = httpx.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in answer["data"]] == ["base", "alpha", "beta"]
    assert answer["data"][1]["parent"] == "base"


def test_concurrent_mixed_adapters_equal_single_adapter_greedy(server):
    prompts = ["hello world", "tell me a story about cats", "w1 w2 w3", "w40", "a story", "w7 w8 w9 w10 w11"]
    models = ["alpha", "beta", "base", "alpha", "beta", "base"]

    async def ask_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "model": m, "prompt": p, "max_tokens": 6 + i, "temperature": 0}) for i, (p, m) in
                enumerate(zip(prompts, models, strict=True))))

    replies = asyncio.run(ask_all())
    state = server.state
    tokenizer, model = state.tokenizer, state.registry.model
    texts = set()
    for i, (reply, prompt, name) in enumerate(zip(replies, prompts, models, strict=True)):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        ids = tokenizer(prompt)["input_ids"]
        expected = greedy_alone(model, ids, None if name == "base" else name, 6 + i, tokenizer.eos_token_id)
        assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                                 "total_tokens": len(ids) + len(expected)}
        assert body["model"] == name
        texts.add(body["choices"][0]["text"])
    assert len(texts) > 1


def test_chat_and_streaming_give_the_same_answer(server):
    request = {"model": "beta", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 8,
               "temperature": 0}
    whole = post(server, "/v1/chat/completions", request).json()
    assert whole["object"] == "chat.completion"
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**request, "stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "gamma", "prompt": "hello"}, 404, ["'gamma'", "does not exist", "alpha"]),
    ({"model": "alpha", "prompt": "hello", "max_tokens": 1000}, 400, ["max_tokens", "1 to 24"]),
    ({"model": "alpha", "prompt": "w1 " * 50}, 400, ["prompt has", "at most 40"]),
    ({"model": "alpha", "prompt": ""}, 400, ["prompt"]),
    ({"model": "alpha", "prompt": "hi", "temperature": "hot"}, 400, ["temperature"]),
    ({"model": "alpha", "prompt": "hi", "stop": ["a"] * 9}, 400, ["stop"]),
    ({"model": "alpha", "prompt": "hi", "stream": "yes"}, 400, ["stream", "true or false"]),
    ({"model": "alpha", "prompt": "hi", "n": 2}, 400, ["'n' must be 1"]),
    ({"model": "alpha", "prompt": "x " * 3000}, 413, ["over 4096 bytes"]),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_survives(server, body, status, words):
    reply = post(server, "/v1/completions", body)
    assert reply.status_code == status
    message = reply.json()["error"]["message"]
    assert all(w in message for w in words), message
    assert post(server, "/v1/completions", {"model": "alpha", "prompt": "hello", "max_tokens": 2}).status_code == 200


def test_bad_json_is_400(server):
    reply = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]
    chat = post(server, "/v1/chat/completions", {"model": "alpha", "messages": "hi"})
    assert chat.status_code == 400 and "messages" in chat.json()["error"]["message"]


def test_overload_answers_429_and_every_admitted_request_is_served(server):
    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "model": ["alpha", "beta"][i % 2], "prompt": "hello world", "max_tokens": 24}) for i in range(24)))

    statuses = [r.status_code for r in asyncio.run(flood())]
    # 429 from the app's bound; 503 only from uvicorn's connection cap behind it
    assert set(statuses) <= {200, 429, 503} and statuses.count(429) > 0
    assert statuses.count(200) >= LIMITS.max_concurrent
    assert httpx.get(server.url + "/health", timeout=10).json()["in_flight"] == 0


def test_runtime_registration_is_off_by_default(server, world):
    reply = post(server, "/v1/adapters", {"path": str(world["adapters"] / "alpha.safetensors")})
    assert reply.status_code == 403 and "--allow-register" in reply.json()["error"]["message"]


def test_runtime_registration_is_confined_to_the_adapter_folders(world, tmp_path):
    from serve_helpers import lora_adapter, tiny_llm

    import mm

    handle = start(world, allow_register=True)
    try:
        model = handle.state.registry.model
        lora_adapter(model, "gamma", seed=9)
        mm.save_adapters(model, tmp_path / "gamma.safetensors", ["gamma"])
        mm.delete_adapter(model, "gamma")
        outside = post(handle, "/v1/adapters", {"path": str(tmp_path / "gamma.safetensors")})
        assert outside.status_code == 400 and "not inside the adapter folders" in outside.json()["error"]["message"]
        escape = str(world["adapters"] / ".." / ".." / tmp_path.name / "gamma.safetensors")
        assert post(handle, "/v1/adapters", {"path": escape}).status_code == 400
        other = tiny_llm(50, hidden=32)  # an adapter for another base: its shapes do not fit
        lora_adapter(other, "delta", seed=3)
        mm.save_adapters(other, world["adapters"] / "delta.safetensors.part", ["delta"])
        misfit = post(handle, "/v1/adapters", {"path": str(world["adapters"] / "delta.safetensors.part")})
        assert misfit.status_code == 400 and "delta.safetensors.part" in misfit.json()["error"]["message"]
        (world["adapters"] / "gamma.safetensors").write_bytes((tmp_path / "gamma.safetensors").read_bytes())
        added = post(handle, "/v1/adapters", {"path": str(world["adapters"] / "gamma.safetensors")})
        assert added.json() == {"registered": ["gamma"]}
        assert post(handle, "/v1/completions", {"model": "gamma", "prompt": "hello"}).status_code == 200
        assert post(handle, "/v1/completions", {"model": "alpha", "prompt": "hello"}).status_code == 200
    finally:
        handle.stop()
        for name in ("gamma.safetensors", "delta.safetensors.part"):
            (world["adapters"] / name).unlink(missing_ok=True)


def test_pool_server_of_one_slot_answers_as_attached_adapters(server, world):
    """--pool-slots 1: both adapters served through one device slot, answers equal the attached ones'."""
    pooled = start(world, pool_slots=1)
    try:
        assert pooled.state.registry.pool.slots == 1
        bodies = [{"model": m, "prompt": "tell me a story", "max_tokens": 10, "temperature": 0}
                  for m in ["alpha", "beta", "base", "beta", "alpha"]]

        async def ask(url):
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

        got = [r.json()["choices"][0]["text"] for r in asyncio.run(ask(pooled.url))]
        want = [r.json()["choices"][0]["text"] for r in asyncio.run(ask(server.url))]
        assert got == want and len(set(want)) == 3
        assert pooled.state.registry.pool.evictions > 0
    finally:
        pooled.stop()


def test_stop_string_ends_the_answer_before_it(server):
    whole = post(server, "/v1/completions", {"model": "alpha", "prompt": "hello world", "max_tokens": 12,
                                             "temperature": 0}).json()["choices"][0]
    words = whole["text"].split()
    assert len(words) >= 3
    stop = words[2]
    cut = post(server, "/v1/completions", {"model": "alpha", "prompt": "hello world", "max_tokens": 12,
                                           "temperature": 0, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"]
    assert whole["text"].startswith(cut["text"]) and len(cut["text"]) < len(whole["text"])
