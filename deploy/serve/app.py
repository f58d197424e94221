"""The HTTP routes of ``nsn-serve``: the OpenAI API (completions, chat completions, embeddings,
models), ``/health``, ``/metrics`` and the NSN routes (status, override, the governor's events,
the page). Routes are thin: they check the request, hand a ``Job`` to the scheduler, and turn its
events into the OpenAI wire format. They never call the runtime.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime import prompt_ids
from ..text import check_token_ids
from .chat import ChatTemplate, ChatTemplateError
from .events import EventHub
from .guard import RETRY_AFTER_S, Guard
from .page import page_response, static_file
from .scheduler import BelowMinRank, Draining, Job, QueueFull, Scheduler
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, NSNOptions, OverrideRequest

log = logging.getLogger("nsn.serve")
DISCONNECT_POLL_S = 0.5
TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|literal|function-|union|tagged-union|json-or-python)")


class APIError(Exception):
    """An error in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def job_error(payload: dict) -> APIError:
    """A job's error event as the route's error: 503s (the server stopping) say when to retry."""
    if payload["status"] == 503:
        return unavailable(payload["message"], "shutting_down")
    return APIError(payload["status"], payload["message"], "server_error")


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, "service_unavailable", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class ServerState:
    """Everything the routes share; ``load`` fills the model half on a background thread."""

    model_name: str
    api_key: str | None = None
    max_tokens: int = 512
    scheduler: Scheduler | None = None
    governor: Any = None
    chat_template: ChatTemplate | None = None
    tokenizer: Any = None  # the routes' own: the runtime's belongs to the scheduler thread (a Rust
    # tokenizer used from two threads at once fails with "Already borrowed")
    runtime_label: str = ""
    prompt_limit: int = 0  # the longest prompt the runtime takes
    context_limit: int = 0  # the longest prompt + completion (the model's, or a TensorRT profile's)
    levels: list[int] = field(default_factory=list)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    started_s: float = field(default_factory=time.time)
    metrics: Any = None
    events: EventHub = field(default_factory=EventHub)
    ticker: Any = None  # stops the page's ticks when there is no governor

    @property
    def runtime(self):
        return self.scheduler.runtime

    @property
    def decoder(self) -> bool:
        return self.runtime.info.task == "text-generation"


def create_app(state: ServerState, load=None, unload=None, max_body_bytes: int = 1 << 20,
               request_timeout_s: float = 30.0) -> Guard:
    """The ASGI app, inside its ``Guard`` (body limit, drain). ``load()`` runs on a thread at start-up
    (``/health`` says 503 until it is done); ``unload()`` at shutdown."""

    async def lifespan(app):
        loader = threading.Thread(target=load, name="nsn-load", daemon=True) if load else None
        if loader:
            loader.start()
        else:
            state.ready = True
        yield
        state.draining = True
        if unload:
            await asyncio.get_running_loop().run_in_executor(None, unload)

    app = FastAPI(title="nsn-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nsn = state

    # ---- errors: the OpenAI shape, 400 for validation, never a traceback ---------------------------------
    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error.status, error.message, error.kind, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        first = error.errors()[0]
        location = []
        for part in first.get("loc", ())[1:]:  # after "body"
            if isinstance(part, str) and TYPE_TAG.match(part):
                union = True  # pydantic names the member of a union it tried: say what the field takes
                break
            location.append(str(part))
        else:
            union = False
        param = ".".join(location) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif first.get("type") == "extra_forbidden":
            message = f"unknown or unsupported field {param!r}"
        elif union and location and location[-1] in ("prompt", "input"):
            message = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
        return error_response(400, f"{param + ': ' if param else ''}{message}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error; see the server log", "server_error")

    def authorized(request: Request) -> None:
        """``Authorization: Bearer KEY`` on every /v1 route when a key is set (constant-time compare)."""
        if not state.api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")

    def ready() -> ServerState:
        if state.load_error:
            raise unavailable(f"the model failed to load: {state.load_error}", "model_load_failed")
        if not state.ready:
            raise unavailable("the model is loading", "loading")
        return state

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {state.model_name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    # ---- plain routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.load_error or not state.ready or state.draining:
            status = "failed" if state.load_error else "draining" if state.draining else "loading"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body = state.metrics.text() if state.metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        ready()
        info = state.runtime.info
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started_s), "owned_by": "nsn-export",
            "nsn": {"max_rank": info.max_rank, "levels": state.levels, "task": info.task,
                    "runtime": state.runtime_label, "context_length": state.context_limit}}]}

    # ---- completions -----------------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        ready()
        check_model(body.model)
        require_decoder("/v1/completions")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; this server takes one per request",
                               param="prompt")
            prompt = prompt[0]
        try:
            ids = prompt_ids(prompt, state.tokenizer, state.runtime.vocab_size)
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from None
        return await generate(request, body, ids, "text_completion")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        ready()
        check_model(body.model)
        require_decoder("/v1/chat/completions")
        if state.chat_template is None:
            raise APIError(400, f"model {state.model_name!r} has no chat template (no chat_template in its "
                                f"tokenizer_config.json or chat_template.jinja); use /v1/completions",
                           param="messages", code="no_chat_template")
        if state.tokenizer is None:
            raise APIError(400, "this export has no tokenizer.json, so it cannot read chat text; use "
                                "/v1/completions with token ids", param="messages")
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        try:
            text = state.chat_template.render(messages)
        except ChatTemplateError as error:
            raise APIError(400, str(error), param="messages") from None
        try:  # the template writes the special tokens itself
            ids = prompt_ids(text, state.tokenizer, state.runtime.vocab_size, add_special_tokens=False)
        except ValueError as error:
            raise APIError(400, f"the chat template rendered no tokens ({error})", param="messages") from None
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await generate(request, body, ids, "chat.completion")

    def require_decoder(route: str) -> None:
        if not state.decoder:
            raise APIError(400, f"{route} needs a decoder model; {state.model_name!r} is an encoder "
                                f"(task {state.runtime.info.task}): use /v1/embeddings", code="wrong_task")

    def submit(job: Job) -> None:
        try:
            state.scheduler.submit(job)
        except QueueFull as error:
            raise unavailable(str(error), "queue_full") from None
        except BelowMinRank as error:
            raise unavailable(str(error), "below_min_rank") from None
        except Draining as error:
            raise unavailable(str(error), "shutting_down") from None

    def job_for(request_nsn: NSNOptions | None, kind: str, events: asyncio.Queue, **fields) -> Job:
        loop = asyncio.get_running_loop()
        nsn = request_nsn or NSNOptions()
        top = state.runtime.info.max_rank
        for name in ("max_rank", "min_rank"):
            value = getattr(nsn, name)
            if value is not None and value > top:
                raise APIError(400, f"nsn.{name} = {value} is above the model's maximum rank {top}",
                               param=f"nsn.{name}")
        if nsn.max_rank is not None and nsn.min_rank is not None and nsn.min_rank > nsn.max_rank:
            raise APIError(400, f"nsn.min_rank {nsn.min_rank} is above nsn.max_rank {nsn.max_rank}",
                           param="nsn.min_rank")
        return Job(kind, lambda event, payload: loop.call_soon_threadsafe(events.put_nowait, (event, payload)),
                   max_rank=nsn.max_rank, min_rank=nsn.min_rank, **fields)

    async def generate(request: Request, body, prompt_ids: list[int], kind: str):
        max_tokens = body.max_tokens if body.max_tokens is not None else min(16, state.max_tokens)
        if max_tokens > state.max_tokens:
            raise APIError(400, f"max_tokens = {max_tokens} is above this server's limit {state.max_tokens} "
                                f"(--max-tokens)", param="max_tokens")
        if len(prompt_ids) > state.prompt_limit or len(prompt_ids) + max_tokens > state.context_limit:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens and max_tokens is {max_tokens}: "
                                f"{len(prompt_ids) + max_tokens} tokens, above the model's context of "
                                f"{state.context_limit} (prompts up to {state.prompt_limit}); shorten the prompt or "
                                f"lower max_tokens", param="max_tokens", code="context_length_exceeded")
        sampling = {"do_sample": body.temperature > 0, "temperature": body.temperature or 1.0, "top_k": body.top_k,
                    "top_p": body.top_p, "seed": body.seed, "stop_ids": set() if body.ignore_eos else None}
        events: asyncio.Queue = asyncio.Queue()
        job = job_for(body.nsn, "generate", events, prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
                      stop=body.stop or [])
        submit(job)
        ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(job, events, ident, created, kind, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces: list[str] = []
        async for event, payload in job_events(request, job, events):
            if event == "token":
                pieces.append(payload["text"])
            elif event == "error":
                raise job_error(payload)
        text = "".join(pieces) + payload["text_rest"]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if kind == "chat.completion"
                  else {"index": 0, "text": text, "logprobs": None})
        return {"id": ident, "object": kind, "created": created, "model": state.model_name,
                "choices": [{**choice, "finish_reason": payload["finish_reason"]}], "usage": usage(payload),
                "nsn": payload["nsn"]}

    async def job_events(request: Request, job: Job, events: asyncio.Queue):
        """The job's events, up to its last (``done`` or ``error``). The client is checked every
        ``DISCONNECT_POLL_S``, even while tokens flow: one that went away cancels the job (it stops at
        its next token and is counted as an abort)."""
        next_check_s = time.monotonic() + DISCONNECT_POLL_S
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=max(next_check_s - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() >= next_check_s:
                next_check_s = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    job.cancelled = True
                    raise APIError(499, "the client closed the connection", code="client_closed")
            if event is not None:
                yield event
                if event[0] != "token":
                    return

    async def stream(job: Job, events: asyncio.Queue, ident: str, created: int, kind: str, include_usage: bool):
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def chunk(text: str | None, finish_reason=None, nsn=None, first=False) -> str:
            if kind == "chat.completion":
                delta = ({"role": "assistant", "content": text or ""} if first else
                         {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {"id": ident, "object": chunk_kind, "created": created, "model": state.model_name,
                    "choices": [choice]}
            if nsn is not None:
                body["nsn"] = nsn
            return f"data: {json.dumps(body)}\n\n"

        first = True
        try:
            while True:
                event, payload = await events.get()
                if event == "token":
                    nsn = {"rank": payload["rank"], "token": payload["token"]}
                    if payload.get("drafted"):  # proposed by the speculative draft rank and kept
                        nsn["drafted"] = True
                    yield chunk(payload["text"], nsn=nsn, first=first)
                    first = False
                elif event == "error":
                    yield "data: " + json.dumps({"error": {"message": payload["message"], "type": "server_error",
                                                           "param": None, "code": None}}) + "\n\n"
                    break
                else:
                    yield chunk(payload["text_rest"] or None, payload["finish_reason"], payload["nsn"], first=first)
                    if include_usage:
                        yield "data: " + json.dumps({"id": ident, "object": chunk_kind, "created": created,
                                                     "model": state.model_name, "choices": [],
                                                     "usage": usage(payload)}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): a running job stops at its next token
            job.cancelled = True

    def usage(payload: dict) -> dict:
        prompt, completion = payload.get("prompt_tokens", 0), payload.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- embeddings -----------------------------------------------------------------------------------------
    @app.post("/v1/embeddings", dependencies=[Depends(authorized)])
    async def embeddings(body: EmbeddingRequest, request: Request):
        ready()
        check_model(body.model)
        if state.decoder:
            raise APIError(400, f"/v1/embeddings needs an encoder model; {state.model_name!r} is a decoder: use "
                                f"/v1/completions", code="wrong_task")
        inputs = body.input
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs or any(len(item) == 0 for item in inputs):
            raise APIError(400, "input is empty; give a string, a list of strings or token ids", param="input")
        if len(inputs) > 2048:
            raise APIError(400, f"input holds {len(inputs)} items, above 2048; split the request", param="input")
        texts = [item for item in inputs if isinstance(item, str)]
        if texts and state.tokenizer is None:
            raise APIError(400, "this export has no tokenizer.json; send token ids", param="input")
        try:
            for item in inputs:
                if not isinstance(item, str):
                    check_token_ids(item, state.runtime.vocab_size, "input token ids")
        except ValueError as error:
            raise APIError(400, str(error), param="input") from None
        longest = state.prompt_limit  # inputs are cut there: count what the model reads
        tokens = sum(min(len(e.ids), longest) for e in state.tokenizer.encode_batch(texts)) if texts else 0
        tokens += sum(min(len(item), longest) for item in inputs if not isinstance(item, str))
        events: asyncio.Queue = asyncio.Queue()
        job = job_for(body.nsn, "embed", events, inputs=inputs, input_tokens=tokens)
        submit(job)
        async for event, payload in job_events(request, job, events):
            pass
        if event == "error":
            raise job_error(payload)
        vectors = payload["embeddings"].astype(np.float32)
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(vector.tobytes()).decode() if body.encoding_format == "base64"
                 else vector.tolist()} for index, vector in enumerate(vectors)]
        return {"object": "list", "data": data, "model": state.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "nsn": payload["nsn"]}

    # ---- NSN routes: status, override, the governor's live events, the page --------------------------------
    @app.get("/v1/nsn/status", dependencies=[Depends(authorized)])
    async def status():
        return state.events.status(state)

    @app.post("/v1/nsn/override", dependencies=[Depends(authorized)])
    async def override(body: OverrideRequest):
        ready()
        if state.governor is None:
            raise APIError(409, "this server runs without a governor (--no-governor); restart it with one",
                           code="no_governor")
        try:
            state.governor.override(body.rank)
        except ValueError as error:
            raise APIError(400, str(error), param="rank") from None
        return {"override": body.rank}

    @app.get("/v1/nsn/events", dependencies=[Depends(authorized)])
    async def events(request: Request):
        return StreamingResponse(state.events.stream(request, state), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    async def page():
        return page_response()

    @app.get("/nsn/page")
    async def page_config():
        """What the page must know before it has a key: only whether one is needed."""
        return {"key_required": bool(state.api_key)}

    @app.get("/static/{name}")
    async def static(name: str):
        return static_file(name)

    return Guard(app, max_body_bytes, lambda: state.draining, request_timeout_s)
