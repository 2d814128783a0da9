"""The OpenAI-compatible HTTP app of ``mmtune serve`` (FastAPI): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (optionally streamed as server-sent events) and, when enabled, ``/v1/adapters``.

The ``model`` field names the adapter (as vLLM's multi-LoRA serving does); the base model's own name
serves the base. Every bad request is answered with a 4xx and an OpenAI-style error body
``{"error": {"message", "type", "code"}}``; overload (more than ``max_concurrent`` requests in flight) is a
429 at once, never an unbounded queue. With an API key set, every route needs ``Authorization: Bearer
<key>``, compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from train.serving.engine import GenerationRequest
from train.serving.registry import AdapterRegistry
from train.serving.worker import GenerationWorker, Ticket


@dataclass
class ServeLimits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 256  # per request's answer
    max_prompt_tokens: int = 1024
    max_concurrent: int = 64  # requests in flight (running + waiting); one more gets 429
    max_stop: int = 4  # stop strings per request, as OpenAI allows


@dataclass
class ServeState:
    base_name: str
    tokenizer: Any
    registry: AdapterRegistry
    worker: GenerationWorker
    limits: ServeLimits = field(default_factory=ServeLimits)
    api_key: str | None = None
    allow_register: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers=headers)


def build_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="mmtune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.kind, err.code)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if state.api_key is not None and not _authorized(request, state.api_key):
            return error_response(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                  "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > state.limits.max_body_bytes):
            return error_response(413, f"request body over {state.limits.max_body_bytes} bytes", code="body_too_large")
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        names = [state.base_name, *state.registry.names()]
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": state.created, "owned_by": "mmtune",
             "parent": None if n == state.base_name else state.base_name} for n in names]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": state.in_flight}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request, state.limits)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)", code="bad_prompt")
        return await _generate(state, body, _encode(state, prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request, state.limits)
        return await _generate(state, body, _encode_chat(state, body.get("messages")), chat=True)

    @app.post("/v1/adapters")
    async def register_adapter(request: Request) -> dict:
        if not state.allow_register:
            raise ApiError(403, "registering adapters at run time is off (start with --allow-register)",
                           "permission_error", "register_disabled")
        body = await _json_body(request, state.limits)
        if not isinstance(body.get("path"), str):
            raise ApiError(400, "'path' must be the adapter file's path (inside the adapter folders)")
        from mm.errors import MMTuneError

        try:
            path = state.registry.confined(body["path"])
            names = await asyncio.to_thread(state.registry.register, path)
        except MMTuneError as err:
            raise ApiError(400, str(err), code="bad_adapter") from None
        except OSError as err:
            raise ApiError(400, f"{body['path']}: {err.strerror or type(err).__name__}", code="bad_adapter") from None
        return {"registered": names}

    return app


def _authorized(request: Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for any wrong key of a given length as for another: no timing oracle.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _json_body(request: Request, limits: ServeLimits) -> dict:
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload cannot grow past the limit
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"body is not valid JSON ({err})", code="bad_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", code="bad_json")
    return body


def _encode(state: ServeState, text: str) -> list[int]:
    ids = state.tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > state.limits.max_prompt_tokens:
        raise ApiError(400, f"prompt has {len(ids)} tokens; this server takes at most "
                            f"{state.limits.max_prompt_tokens}", code="prompt_too_long")
    if not ids:
        raise ApiError(400, "prompt encodes to no tokens", code="bad_prompt")
    return ids


def _encode_chat(state: ServeState, messages: Any) -> list[int]:
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with string values",
                       code="bad_messages")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(state.tokenizer, "chat_template", None):
        text = state.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # no template: the turns as plain lines, then an open assistant turn
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return _encode(state, text)


def _options(state: ServeState, body: dict) -> tuple[str | None, int, float, list[str], bool]:
    model = body.get("model", state.base_name)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", code="bad_model")
    if model != state.base_name and model not in state.registry.files:
        known = ", ".join([state.base_name, *state.registry.names()])
        raise ApiError(404, f"model {model!r} does not exist; this server has: {known}", code="model_not_found")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= state.limits.max_tokens:
        raise ApiError(400, f"'max_tokens' must be an integer from 1 to {state.limits.max_tokens}, got {max_tokens!r}",
                       code="bad_max_tokens")
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be a number from 0 to 2, got {temperature!r}", code="bad_temperature")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > state.limits.max_stop
            or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {state.limits.max_stop} non-empty strings",
                       code="bad_stop")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1 (one answer per request)", code="bad_n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", code="bad_seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", code="bad_stream")
    return (None if model == state.base_name else model), max_tokens, float(temperature), stop, stream


async def _generate(state: ServeState, body: dict, prompt_ids: list[int], *, chat: bool):
    adapter, max_tokens, temperature, stops, stream = _options(state, body)
    if state.in_flight >= state.limits.max_concurrent:
        return error_response(429, f"server busy: {state.limits.max_concurrent} requests in flight; retry later",
                              "rate_limit_error", "overloaded", {"Retry-After": "1"})
    decode = state.tokenizer.decode
    eos = state.tokenizer.eos_token_id
    request = GenerationRequest(
        prompt_ids=prompt_ids, adapter=adapter, max_new_tokens=max_tokens, temperature=temperature,
        seed=body.get("seed"), stop_ids=() if eos is None else (eos,),
        stop=(lambda tokens: any(s in decode(tokens, skip_special_tokens=True) for s in stops)) if stops else None)
    loop = asyncio.get_running_loop()
    ticket = Ticket(request, loop, loop.create_future(), asyncio.Queue() if stream else None)
    state.in_flight += 1
    state.worker.submit(ticket)
    model = body.get("model", state.base_name)
    if stream:
        return StreamingResponse(_stream(state, ticket, model, chat, stops), media_type="text/event-stream")
    try:
        await ticket.done
    except asyncio.CancelledError:  # the client went away: free its row instead of generating on
        request.cancelled = True
        raise
    except Exception as err:
        raise ApiError(500, f"generation failed: {type(err).__name__}: {err}", "server_error") from None
    finally:
        state.in_flight -= 1
    text = _cut(decode(request.tokens, skip_special_tokens=True), stops)
    return _answer(model, request, text, chat)


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string (which the answer does not include, as OpenAI's API)."""
    ends = [text.find(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


def _answer(model: str, request: GenerationRequest, text: str, chat: bool) -> dict:
    usage = {"prompt_tokens": request.prompt_length, "completion_tokens": len(request.tokens),
             "total_tokens": request.prompt_length + len(request.tokens)}
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}", "created": int(time.time()),
            "model": model, "usage": usage}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": request.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice]}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": request.finish_reason}
    return {**head, "object": "text_completion", "choices": [choice]}


async def _stream(state: ServeState, ticket: Ticket, model: str, chat: bool, stops: list[str]):
    """Server-sent events: one chunk per new piece of text, then the finish reason, then ``[DONE]``."""
    decode, request = state.tokenizer.decode, ticket.request
    sent = ""
    kind, key = ("chat.completion.chunk", "delta") if chat else ("text_completion", "text")
    try:
        while (token := await ticket.tokens.get()) is not None:
            del token  # the text is decoded from all tokens so far: pieces of one word join correctly
            text = _cut(decode(request.tokens, skip_special_tokens=True), stops)
            if len(text) > len(sent) and text.startswith(sent):
                piece, sent = text[len(sent):], text
                payload = {"content": piece} if chat else piece
                chunk = {"id": f"cmpl-{request.request_id}", "object": kind, "model": model,
                         "choices": [{"index": 0, key: payload, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
        await ticket.done
        last = {"id": f"cmpl-{request.request_id}", "object": kind, "model": model,
                "choices": [{"index": 0, key: {} if chat else "", "finish_reason": request.finish_reason}]}
        yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
    finally:
        request.cancelled = request.finish_reason is None  # the stream ended early: free the row
        state.in_flight -= 1
