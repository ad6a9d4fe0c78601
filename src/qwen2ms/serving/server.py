"""The OpenAI-compatible HTTP server over :class:`~qwen2ms.serving.LLMEngine` (FastAPI + uvicorn, imported lazily)."""

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import Qwen2msError
from .engine import EngineStepError
from .llm import chat_stop_token_ids

__all__ = ["EngineLoop", "ServeConfig", "build_app", "run_server", "default_sampling_of", "ServingDependencyError",
           "APIError", "SERVE_EXTRA_HINT"]

logger = logging.getLogger("qwen2ms.serve")

#: The largest request body read (bytes) and the most completions (prompts x n) one request may ask for.
MAX_BODY_BYTES = 32 * 2 ** 20
MAX_CHOICES = 256

#: What to install when FastAPI, uvicorn or prometheus_client is missing.
SERVE_EXTRA_HINT = "pip install 'qwen2ms[serve]' (FastAPI, uvicorn and prometheus-client)"


class ServingDependencyError(Qwen2msError, ImportError):
    """The server's optional dependencies (FastAPI, uvicorn, prometheus-client) are not installed."""


class APIError(Qwen2msError, ValueError):
    """A request the server refuses: the HTTP status and OpenAI's error fields (message, type, param, code)."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def _require_serve_deps() -> None:
    missing = []
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServingDependencyError(f"qwen2ms serve needs {', '.join(missing)}: {SERVE_EXTRA_HINT}")


# ------------------------------------------------------------------------------------------ engine thread
class _Sink:
    """Where one HTTP request's outputs go: an asyncio queue on the server's loop, fed from the engine thread."""

    __slots__ = ("loop", "queue", "base_index", "arrival", "last_token_time", "num_tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop, q: "asyncio.Queue", base_index: int):
        self.loop, self.queue, self.base_index = loop, q, base_index
        self.arrival = time.monotonic()
        self.last_token_time: Optional[float] = None
        self.num_tokens = 0

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed: the server is gone, nobody is waiting
            pass


class EngineLoop:
    """Runs one :class:`~qwen2ms.serving.LLMEngine` in a background thread that owns it.

    The engine is not thread-safe: every call into it happens on this thread. Requests arrive
    through a thread-safe queue; the thread loops ``step()`` while there is work and sleeps on the
    queue when there is none. Each request's outputs reach its asyncio queue through
    ``loop.call_soon_threadsafe``.

    Args:
        engine: the engine (its ``tokenizer`` decodes the outputs).
        metrics: a :class:`~qwen2ms.serving.metrics.ServerMetrics` updated after every step, or None.
    """

    def __init__(self, engine: Any, metrics: Any = None):
        self.engine = engine
        self.metrics = metrics
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self._sinks: Dict[str, _Sink] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.error: Optional[BaseException] = None  # set when the thread itself died

    # ---- lifecycle (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qwen2ms-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the requests already in the engine, then end the thread."""
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests (the asyncio side)
    async def submit(self, request_id: str, prompt: Union[str, List[int]], params: Any,
                     out: "asyncio.Queue", base_index: int = 0) -> None:
        """Add a request; its outputs arrive in ``out`` as ``(base_index, RequestOutput)`` (an exception if
        the engine failed). Raises what ``engine.add_request`` raised (a bad prompt or params)."""
        if not self.alive:
            raise APIError("the engine is not running", status=503, type="server_error")
        loop = asyncio.get_running_loop()
        ack: "asyncio.Future" = loop.create_future()
        self._commands.put(("add", request_id, prompt, params, _Sink(loop, out, base_index), ack))
        await ack

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed on the engine thread at once); unknown ids are ignored."""
        self._commands.put(("abort", request_id))

    # ---- the engine thread
    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "stop":
            self._stopping = True
        elif kind == "abort":
            rid = command[1]
            if self._sinks.pop(rid, None) is not None:
                self.engine.abort_request(rid)
                if self.metrics is not None:
                    self.metrics.finished("abort")
        elif kind == "add":
            _, rid, prompt, params, sink, ack = command
            try:
                self.engine.add_request(rid, prompt, params)
            except BaseException as e:  # noqa: BLE001 - handed to the request's coroutine
                _resolve(sink.loop, ack, e)
                return
            self._sinks[rid] = sink
            _resolve(sink.loop, ack, None)

    def _dispatch(self, outputs: Sequence[Any]) -> None:
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            count = sum(len(c.token_ids) for c in out.outputs)
            if m is not None and count > sink.num_tokens:
                if sink.num_tokens == 0:
                    m.ttft.observe(now - sink.arrival)
                elif sink.last_token_time is not None:
                    m.itl.observe((now - sink.last_token_time) / (count - sink.num_tokens))
                sink.last_token_time = now
            sink.num_tokens = max(sink.num_tokens, count)
            sink.put((sink.base_index, out))
            if out.finished:
                del self._sinks[out.request_id]
                if m is not None:
                    m.e2e.observe(now - sink.arrival)
                    for c in out.outputs:
                        m.finished(c.finish_reason)

    def _fail(self, request_ids: Sequence[str], error: BaseException) -> None:
        for rid in request_ids:
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                sink.put(error)

    def _fail_all(self, error: BaseException) -> None:
        for rid, sink in list(self._sinks.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - the engine is already failing; free what can be freed
                pass
            sink.put(error)
        self._sinks.clear()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not engine.has_unfinished_requests():
                    if self._stopping and self._commands.empty():
                        return
                    self._handle(self._commands.get())  # idle: sleep until a request (or stop) arrives
                while True:
                    try:
                        self._handle(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except EngineStepError as e:  # the engine aborted these; the others keep running
                        logger.error("engine step failed; requests %s get a 500:\n%s", e.request_ids,
                                     traceback.format_exc())
                        if self.metrics is not None:
                            self.metrics.engine_errors.inc()
                        self._fail(e.request_ids, e)
                    except Exception as e:  # noqa: BLE001 - fail every request, keep serving the next ones
                        logger.error("engine step failed; its requests get a 500:\n%s", traceback.format_exc())
                        if self.metrics is not None:
                            self.metrics.engine_errors.inc()
                        self._fail_all(e)
                    else:
                        self._dispatch(outputs)
                if self.metrics is not None:
                    self.metrics.update(engine.stats())
        except BaseException as e:  # noqa: BLE001 - recorded for /health and the waiting requests
            self.error = e
            logger.error("the engine thread died:\n%s", traceback.format_exc())
            self._fail_all(e)


def _resolve(loop: asyncio.AbstractEventLoop, fut: "asyncio.Future", error: Optional[BaseException]) -> None:
    def done() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:
        pass


# ------------------------------------------------------------------------------------------ the app
@dataclass
class ServeConfig:
    """What the server needs besides the engine.

    Attributes:
        served_model_name: the ``model`` name clients send and ``/v1/models`` lists.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_model_len: prompt plus completion tokens allowed per request.
        default_sampling: SamplingParams defaults for fields a request leaves unset (the checkpoint's
            generation_config.json: temperature, top_p, top_k, repetition_penalty).
        chat_stop_token_ids: ids that end a chat reply (eos and ``<|im_end|>``).
    """

    served_model_name: str
    max_model_len: int
    api_key: Optional[str] = None
    default_sampling: Dict[str, Any] = field(default_factory=dict)
    chat_stop_token_ids: List[int] = field(default_factory=list)


def default_sampling_of(engine: Any) -> Dict[str, Any]:
    """The sampling defaults of the served checkpoint (its generation_config.json through
    ``engine.default_sampling_params()``; vLLM's ``--generation-config auto``) for fields a request leaves unset."""
    params = engine.default_sampling_params()
    return {key: getattr(params, key) for key in ("temperature", "top_p", "top_k", "repetition_penalty")}


def _param_of(message: str, fields: Sequence[str]) -> Optional[str]:
    """The request field an error message starts with (SamplingParams' messages name their field first)."""
    head = message.split(" ", 1)[0].rstrip(":,")
    return head if head in fields else None


def build_app(engine_loop: EngineLoop, config: ServeConfig, metrics: Any = None) -> Any:
    """The FastAPI application: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``,
    ``/metrics``. The engine loop must be started (and stopped) by the caller, or by :func:`run_server`."""
    _require_serve_deps()
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .params import SamplingParams
    from .protocol import (SAMPLING_FIELDS, ChatCompletionRequest, CompletionRequest, chat_completion_body,
                           chat_completion_chunk, completion_body, completion_chunk, error_body, models_body,
                           new_id, usage_body)

    engine = engine_loop.engine
    tokenizer = engine.tokenizer
    name = config.served_model_name
    started = int(time.time())
    app = FastAPI(title="qwen2ms", description="OpenAI-compatible Qwen2 server on MindSpore", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine_loop = engine_loop

    # ---- errors: OpenAI's body, never a bare 500 page
    def error_response(status: int, message: str, type: str = "invalid_request_error",
                       param: Optional[str] = None, code: Optional[str] = None) -> Any:
        return JSONResponse(error_body(message, type, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Any:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    def validation_error(e: Any) -> Any:
        errors = e.errors()
        parts = []
        for err in errors[:5]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            where = ".".join(loc) or "the body"
            msg = "unrecognized request argument" if err.get("type") == "extra_forbidden" else err.get("msg", "")
            shown = "" if err.get("type") == "missing" else f" (got {json.dumps(err.get('input'), default=str)[:80]})"
            parts.append(f"{where}: {msg}{shown}")
        first = errors[0] if errors else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return error_response(400, "; ".join(parts) or "invalid request", param=param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Any:
        return validation_error(e)

    @app.exception_handler(ValidationError)
    async def _invalid_body(request: Request, e: ValidationError) -> Any:
        return validation_error(e)

    async def parse(request: Request, model: Any) -> Any:
        """The JSON body as ``model`` (whatever the Content-Type, as OpenAI's API reads it)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(f"the request body has {int(declared)} bytes, more than the {MAX_BODY_BYTES} this server "
                           "reads", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(f"the request body has {len(raw)} bytes, more than the {MAX_BODY_BYTES} this server reads",
                           status=413)
        if not raw.strip():
            raise APIError("the request body is empty; send a JSON object (see the OpenAI API reference)",
                           code="invalid_json")
        try:
            data = json.loads(raw)
        except UnicodeDecodeError as e:
            raise APIError(f"the request body is not UTF-8 JSON: {e}", code="invalid_json") from None
        except json.JSONDecodeError as e:
            raise APIError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(f"the request body must be a JSON object, got a JSON {type(data).__name__}",
                           code="invalid_json")
        return model.model_validate(data)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Any:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> Any:
        logger.error("internal error on %s:\n%s", request.url.path, traceback.format_exc())
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    # ---- auth
    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError("invalid or missing API key: send the header 'Authorization: Bearer <key>' with the "
                           "key given to qwen2ms serve --api-key", status=401, type="authentication_error",
                           code="invalid_api_key")

    guarded = [Depends(check_key)]

    # ---- plain endpoints
    @app.get("/health")
    async def health() -> Any:
        if not engine_loop.alive:
            reason = f": {engine_loop.error!r}" if engine_loop.error else ""
            return error_response(503, f"the engine thread is not running{reason}", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Any:
        from .metrics import CONTENT_TYPE_LATEST

        if metrics is None:
            raise APIError("metrics are off", status=404)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> Any:
        return models_body(name, config.max_model_len, started)

    # ---- request -> engine
    def check_model(req: Any) -> None:
        if req.model is not None and req.model != name:
            raise APIError(f"the model {req.model!r} does not exist; this server serves {name!r} (see /v1/models)",
                           status=404, param="model", code="model_not_found")
        bad = req.unsupported()
        if bad is not None:
            raise APIError(f"{bad} is not supported by this server; leave it unset", param=bad,
                           code="unsupported_parameter")

    def sampling_params(req: Any, max_tokens: Optional[int], prompt_len: int, stop_ids: Sequence[int],
                        field_name: str) -> Any:
        room = config.max_model_len - prompt_len
        if room < 1:
            raise APIError(f"This model's maximum context length is {config.max_model_len} tokens. However, your "
                           f"{field_name} has {prompt_len} tokens; shorten it to at most "
                           f"{config.max_model_len - 1} tokens", param=field_name, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {field_name}, "
                           f"{max_tokens} in the completion); reduce the {field_name} or max_tokens (at most "
                           f"{room} here)", param="max_tokens", code="context_length_exceeded")
        values: Dict[str, Any] = dict(config.default_sampling)
        for key in SAMPLING_FIELDS:
            value = getattr(req, key)
            if value is not None:
                values[key] = value
        ids = list(values.get("stop_token_ids") or [])
        if not values.get("ignore_eos"):
            ids += [i for i in stop_ids if i not in ids]
        values["stop_token_ids"] = ids or None
        values["n"] = req.n
        values["max_tokens"] = room if max_tokens is None else max_tokens
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise APIError(str(e), param=_param_of(str(e), SAMPLING_FIELDS + ("n", "max_tokens"))) from None

    async def start(prompts: List[List[int]], params: List[Any], field_name: str) -> tuple:
        """Submit one engine request per prompt; returns (request ids, output queue)."""
        choices = sum(p.n for p in params)
        if choices > MAX_CHOICES:
            raise APIError(f"the request asks for {choices} completions (prompts x n), more than the {MAX_CHOICES} "
                           "one request may; split it", param="n")
        out: "asyncio.Queue" = asyncio.Queue()
        rid = new_id("req")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                sub = f"{rid}-{i}"
                await engine_loop.submit(sub, prompt, p, out, base_index=i * p.n)
                ids.append(sub)
        except ValueError as e:
            for sub in ids:
                engine_loop.abort(sub)
            raise APIError(str(e), param=field_name) from None
        return ids, out

    async def collect(request: Request, ids: List[str], out: "asyncio.Queue") -> Dict[str, Any]:
        """Wait for every request to finish; a client that hangs up aborts them."""
        pending, last = set(ids), {}
        try:
            while pending:
                try:
                    item = await asyncio.wait_for(out.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return {}
                    continue
                if isinstance(item, BaseException):
                    raise APIError(f"the engine failed: {type(item).__name__}: {item}", status=500,
                                   type="server_error")
                base, res = item
                last[res.request_id] = (base, res)
                if res.finished:
                    pending.discard(res.request_id)
            return last
        finally:
            for sub in pending:
                engine_loop.abort(sub)

    def tokenize_chat(req: ChatCompletionRequest) -> List[int]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(i) for i in ids]

    def tokenize_prompts(req: CompletionRequest) -> List[List[int]]:
        out = []
        for p in req.prompts():
            out.append(tokenizer.encode(p) if isinstance(p, str) else [int(i) for i in p])
        return out

    def usage_of(results: Dict[str, Any]) -> Dict[str, int]:
        prompt = sum(len(r.prompt_token_ids) for _, r in results.values())
        completion = sum(len(c.token_ids) for _, r in results.values() for c in r.outputs)
        return usage_body(prompt, completion)

    def sse(body: Dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def stream(ids: List[str], out: "asyncio.Queue", chunk: Any, rid: str, chat: bool, include_usage: bool,
               num_choices: int, echo: Optional[List[str]] = None) -> Any:
        created = int(time.time())

        async def events():
            pending, sent, closed = set(ids), {}, set()
            prompt_tokens, completion_tokens = {}, {}
            try:
                if chat:
                    for i in range(num_choices):
                        yield sse(chunk(rid, name, created, i, {"role": "assistant", "content": ""}))
                elif echo is not None:
                    for i in range(num_choices):
                        yield sse(chunk(rid, name, created, i, echo[i]))
                while pending:
                    item = await out.get()
                    if isinstance(item, BaseException):
                        yield sse(error_body(f"the engine failed: {type(item).__name__}: {item}", "server_error"))
                        break
                    base, res = item
                    prompt_tokens[res.request_id] = len(res.prompt_token_ids)
                    for c in res.outputs:
                        index = base + c.index
                        completion_tokens[(res.request_id, c.index)] = len(c.token_ids)
                        done = res.finished or c.finish_reason is not None
                        delta = c.text[sent.get(index, 0):]
                        if index in closed or (not delta and not done):
                            continue
                        sent[index] = len(c.text)
                        if done:
                            closed.add(index)
                        piece = {"content": delta} if chat else delta
                        yield sse(chunk(rid, name, created, index, piece, c.finish_reason if done else None))
                    if res.finished:
                        pending.discard(res.request_id)
                if include_usage and not pending:
                    usage = usage_body(sum(prompt_tokens.values()), sum(completion_tokens.values()))
                    yield sse(chunk(rid, name, created, None, usage=usage))
                yield "data: [DONE]\n\n"
            finally:
                # the client went away (the response was cancelled or its send failed) before the end
                for sub in pending:
                    engine_loop.abort(sub)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Any:
        req = await parse(request, ChatCompletionRequest)
        check_model(req)
        try:
            ids = await run_in_threadpool(tokenize_chat, req)
        except ValueError as e:
            raise APIError(f"messages cannot be rendered with the chat template: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, max_tokens, len(ids), config.chat_stop_token_ids, "messages")
        sub_ids, out = await start([ids], [params], "messages")
        rid = new_id("chatcmpl")
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(sub_ids, out, chat_completion_chunk, rid, True, include, params.n)
        results = await collect(request, sub_ids, out)
        choices = [{"index": base + c.index, "text": c.text, "finish_reason": c.finish_reason}
                   for base, r in results.values() for c in r.outputs]
        return chat_completion_body(rid, name, int(time.time()), sorted(choices, key=lambda c: c["index"]),
                                    usage_of(results))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Any:
        req = await parse(request, CompletionRequest)
        check_model(req)
        if isinstance(req.prompt, list) and not req.prompt:
            raise APIError("prompt is an empty list; send a string, a list of strings or a list of token ids",
                           param="prompt")
        try:
            prompts = await run_in_threadpool(tokenize_prompts, req)
        except ValueError as e:
            raise APIError(f"prompt cannot be tokenized: {e}", param="prompt") from None
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
        params = [sampling_params(req, max_tokens, len(p), (), "prompt") for p in prompts]
        sub_ids, out = await start(prompts, params, "prompt")
        rid = new_id("cmpl")
        n = req.n
        echo = None
        if req.echo:
            texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts()]
            echo = [texts[i // n] for i in range(len(prompts) * n)]
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream(sub_ids, out, completion_chunk, rid, False, include, len(prompts) * n, echo)
        results = await collect(request, sub_ids, out)
        choices = [{"index": base + c.index, "text": (echo[base + c.index] if echo else "") + c.text,
                    "finish_reason": c.finish_reason} for base, r in results.values() for c in r.outputs]
        return completion_body(rid, name, int(time.time()), sorted(choices, key=lambda c: c["index"]),
                               usage_of(results))

    return app


# ------------------------------------------------------------------------------------------ running it
def run_server(engine: Any, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: Optional[str] = None, default_sampling: Optional[Dict[str, Any]] = None,
               stop_ids: Optional[Sequence[int]] = None, log_level: str = "info") -> List[int]:
    """Serve ``engine`` over HTTP until SIGINT/SIGTERM, which stop accepting connections, let the running
    requests finish (their streams end normally), then return (a second ctrl-C stops without waiting).

    Args:
        engine: an :class:`~qwen2ms.serving.LLMEngine` with a tokenizer.
        served_model_name: the model name clients use.
        host, port: where to listen (127.0.0.1: this machine only).
        api_key: require ``Authorization: Bearer <api_key>`` on ``/v1/*``.
        default_sampling: SamplingParams defaults for fields a request leaves unset (default:
            :func:`default_sampling_of`, the checkpoint's generation config).
        stop_ids: ids that end a chat reply (default: the tokenizer's eos and ``<|im_end|>``).
        log_level: uvicorn's log level.

    Returns:
        The signals that stopped the server (``[signal.SIGTERM]`` after a SIGTERM).
    """
    _require_serve_deps()
    import uvicorn

    from .metrics import ServerMetrics

    class Server(uvicorn.Server):
        # uvicorn re-raises the signal that stopped it once it has shut down, which kills the process
        # before the engine thread is joined; the signal is returned instead (the CLI's exit code).
        received: List[int] = []

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            with super().capture_signals():
                try:
                    yield
                finally:
                    captured = getattr(self, "_captured_signals", [])
                    self.received = list(captured)
                    captured.clear()

    metrics = ServerMetrics(served_model_name)
    loop_ = EngineLoop(engine, metrics)
    cfg = ServeConfig(served_model_name=served_model_name, max_model_len=int(engine.max_model_len),
                      api_key=api_key, default_sampling=default_sampling_of(engine) if default_sampling is None
                      else dict(default_sampling),
                      chat_stop_token_ids=chat_stop_token_ids(engine.tokenizer) if stop_ids is None
                      else [int(i) for i in stop_ids])
    app = build_app(loop_, cfg, metrics)
    loop_.start()
    try:
        server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                       timeout_graceful_shutdown=None, lifespan="on"))
        server.run()
    finally:
        loop_.stop()
    return list(server.received)
