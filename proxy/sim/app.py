"""The simulated node's HTTP face: a plain ASGI app answering like mlx_lm.server 0.32.2.

Routes (matched exactly, query string included, as mlx's `BaseHTTPRequestHandler` does):

- `POST /v1/chat/completions` (and `/chat/completions`), `POST /v1/completions`;
- `GET /v1/models` (and `/v1/models/<id>`; with `empty_models` the 200 comes with an empty body, as 0.32.2
  sends when there is no Hugging Face cache folder), `GET /health`;
- only with `anthropic=True`: `POST /v1/messages` and `/v1/messages/count_tokens` (query ignored) and a
  200 for Claude Code's `HEAD /` probe;
- `GET /_sim/stats`, `GET|POST /_sim/faults`, `POST /_sim/reset`: the simulator's own controls;
- any other path: 404 `Not Found` (plain text under mlx's `Content-type: application/json`); `OPTIONS`:
  204; `HEAD` and other methods: 501 with `BaseHTTPRequestHandler`'s HTML error page.

Errors as mlx gives them, `{"error": "..."}` with no `Content-Length` (the body ends when the connection
closes): no `Content-Length` 411; bad JSON, a body that is not an object, a sampling parameter of the wrong
type or out of range (`max_tokens` < 1, `stream` not a boolean, ...: `proxy.sim.model.bad_request`), no
`messages` 400; an unknown `model`, an empty `messages` and template failures (non-text content, tool-call
arguments that are not a JSON string) 404.

The app is plain ASGI (not wrapped in Starlette's middleware) on purpose: closing a connection with no
response, or mid-body, needs the server's transport (see `proxy.sim.asgi`). Each inference request watches
for the client going away and cancels its generation then, freeing the slot at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import msgspec
from starlette.types import Receive, Scope, Send

from proxy.sim import chat, messages
from proxy.sim.asgi import (
    CORS,
    DropConnection,
    ResponseEnded,
    close_transport,
    drop,
    mlx_headers,
    read_body,
    send_response,
    wait_disconnect,
)
from proxy.sim.cache import token_count
from proxy.sim.config import SimConfig
from proxy.sim.engine import Finished, Keepalive, SimNode, Started
from proxy.sim.faults import Faults, RequestFaults
from proxy.sim.http10 import error_page, error_page_headers
from proxy.sim.model import (
    Conversation,
    Segment,
    TemplateError,
    bad_request,
    chat_conversation,
    max_tokens_of,
    prompt_segments,
    render_prompt,
    stop_words_of,
    text_cells,
)
from proxy.sim.script import Piece, TokenPlan, plan_tokens, write_reply

CONVERSATION_HEADERS = (b"x-sim-conversation", b"x-session-id")
Planner = Callable[[int, int], TokenPlan]


class Responder(Protocol):
    stream: bool

    def started(self, ev: Started) -> list[bytes]: ...
    def keepalive(self, ev: Keepalive) -> bytes: ...
    def piece(self, p: Piece) -> list[bytes]: ...
    def finished(self, f: Finished) -> list[bytes]: ...
    def body(self, f: Finished) -> bytes: ...
    def garbage(self) -> bytes: ...


class SimApp:
    """ASGI app of one simulated node; build it with `build_sim_app`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.node = SimNode(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        query: bytes = scope.get("query_string", b"")
        full = path + ("?" + query.decode("latin-1") if query else "")
        if path.startswith("/_sim/"):
            await self._control(method, path, receive, send)
        elif self.config.anthropic and path.startswith("/v1/messages") and method == "POST":
            # Native Anthropic servers ignore the query (Claude Code sends `?beta=true`).
            if path == "/v1/messages":
                await self._inference("messages", scope, receive, send)
            elif path == "/v1/messages/count_tokens":
                await self._count_tokens(receive, send)
            else:
                await send_response(send, 404, messages.error_body(404, f"no route {path}"), length=True)
        elif self.config.anthropic and method == "HEAD" and path in ("/", "/api/hello"):
            await send({"type": "http.response.start", "status": 200, "headers": []})  # Claude Code's probe
            await send({"type": "http.response.body", "body": b""})
        elif method == "POST":
            kind = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text"}.get(full)
            if kind is None:
                await send_response(send, 404, b"Not Found")
            else:
                await self._inference(kind, scope, receive, send)
        elif method == "GET":
            if full.startswith("/v1/models"):
                await self._models(full, send)
            elif full == "/health":
                self.node.stats.health_checks += 1
                await self._health(send)
            else:
                await send_response(send, 404, b"Not Found")
        elif method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": mlx_headers()})
            await send({"type": "http.response.body", "body": b""})
        else:
            # BaseHTTPRequestHandler has no do_<METHOD>: send_error(501), no body for HEAD.
            reason = f"Unsupported method ({method!r})"
            page = error_page(501, reason)
            headers = error_page_headers(page)
            await send({"type": "http.response.start", "status": 501, "reason": reason, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else page})

    # --- plain endpoints -------------------------------------------------------------------------------------

    async def _models(self, full: str, send: Send) -> None:
        if self.config.empty_models:
            # mlx-lm 0.32.2 without ~/.cache/huggingface/hub: the 200 headers go out, then scanning the cache
            # raises and the connection closes with no body.
            await send_response(send, 200, b"")
            return
        wanted = full[len("/v1/models/") :] if full.startswith("/v1/models/") else None
        model = {"id": self.config.model, "object": "model", "created": int(time.time())}
        data = [model] if wanted in (None, "", self.config.model) else []
        await send_response(send, 200, msgspec.json.encode({"object": "list", "data": data}))

    async def _count_tokens(self, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        try:
            body = msgspec.json.decode(raw or b"")
            if not isinstance(body, dict):
                raise TemplateError("the body must be a JSON object")
            tokens = token_count(render_prompt(messages.messages_conversation(body)))
        except (msgspec.DecodeError, TemplateError) as exc:
            await send_response(send, 400, messages.error_body(400, str(exc)), length=True)
            return
        await send_response(send, 200, msgspec.json.encode({"input_tokens": tokens}), length=True)

    async def _health(self, send: Send) -> None:
        status = self.node.faults.current.health_status
        body = b'{"status": "ok"}' if status == 200 else b'{"error": "sim fault: health check failing"}'
        await send_response(send, status, body)

    async def _control(self, method: str, path: str, receive: Receive, send: Send) -> None:
        node = self.node
        if path == "/_sim/stats" and method == "GET":
            await send_response(send, 200, msgspec.json.encode(node.view()), length=True)
        elif path == "/_sim/faults" and method == "GET":
            await send_response(send, 200, msgspec.json.encode(node.faults.current), length=True)
        elif path == "/_sim/faults" and method == "POST":
            raw = await read_body(receive)
            try:
                faults = msgspec.json.decode(raw or b"{}", type=Faults)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                await send_response(send, 400, msgspec.json.encode({"error": str(exc)}), length=True)
                return
            node.faults.set(faults)
            await send_response(send, 200, msgspec.json.encode(faults), length=True)
        elif path == "/_sim/reset" and method == "POST":
            await read_body(receive)
            node.reset()
            await send_response(send, 200, b'{"status": "reset"}', length=True)
        else:
            await send_response(send, 404, b"Not Found", length=True)

    # --- inference ----------------------------------------------------------------------------------------------

    async def _inference(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        node = self.node
        node.active += 1
        node.stats.requests += 1
        conversation = _conversation(scope)
        try:
            if kind != "messages" and (problem := _length_problem(scope)) is not None:
                await read_body(receive)
                await self._error(send, kind, *problem)
                return
            raw = await read_body(receive)
            if raw is None:
                node.stats.disconnects += 1
                return
            await self._watched(self._serve(kind, raw, node.faults.take(), conversation, send), receive, send)
        except asyncio.CancelledError:
            # Only the server cancels a request: it is shutting down and the grace period is over (a hung
            # request). Hang up quietly instead of leaving a traceback in the log.
            if close_transport(send):
                await asyncio.sleep(0)  # let the server see the connection go
        finally:
            node.active -= 1

    async def _watched(self, serve: Coroutine[Any, Any, None], receive: Receive, send: Send) -> None:
        """Run `serve` until it ends or the client goes away (then cancel it: that frees the slot)."""
        stats = self.node.stats
        task = asyncio.ensure_future(serve)
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                stats.disconnects += 1
                task.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            try:
                await task
            except asyncio.CancelledError:
                pass
            except ResponseEnded:
                stats.errors += 1
            except DropConnection as exc:
                stats.errors += 1
                await drop(send, receive, reset=exc.reset)

    async def _error(self, send: Send, kind: str, status: int, message: str) -> None:
        self.node.stats.errors += 1
        if kind == "messages":
            await send_response(send, status, messages.error_body(status, message), length=True)
        else:
            await send_response(send, status, json.dumps({"error": message}).encode())

    async def _serve(self, kind: str, raw: bytes, faults: RequestFaults, conversation: str | None, send: Send) -> None:
        """Everything after the body was read; runs as a task that is cancelled if the client leaves."""
        if faults.slow_first_byte_s:
            await asyncio.sleep(faults.slow_first_byte_s)
        if faults.close:
            raise DropConnection
        if faults.fail_status:
            await self._error(send, kind, faults.fail_status, f"sim fault: injected HTTP {faults.fail_status}")
            return
        if faults.hang:
            self.node.hanging += 1
            try:
                await self.node.faults.changed_since(faults.generation)
                while self.node.faults.current.hang:
                    await self.node.faults.changed_since(self.node.faults.generation)
            finally:
                self.node.hanging -= 1
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            await self._error(send, kind, 400, f"Invalid JSON in request body: {_json_error(raw)}")
            return
        if kind == "messages":
            await self._serve_messages(body, faults, conversation, send)
            return
        if (problem := bad_request(body, chat=kind == "chat")) is not None:
            await self._error(send, kind, 400, problem)
            return
        requested = body.get("model", "default_model")
        if requested not in ("default_model", self.config.model):
            message = f"Failed to load model {requested!r}: this sim node serves only {self.config.model!r}"
            await self._error(send, kind, 404, message)
            return
        try:
            if kind == "chat":
                conv = chat_conversation(body)
                prompt = render_prompt(conv)
                segments = prompt_segments(conv, prompt)
            else:
                if not isinstance(body["prompt"], str):
                    raise TemplateError(f"the prompt must be a string, not {type(body['prompt']).__name__}")
                conv = Conversation((), (), ())
                prompt = text_cells(body["prompt"])
                segments = prompt_segments(None, prompt)
        except TemplateError as exc:
            await self._error(send, kind, 404, str(exc))
            return
        stream = bool(body.get("stream", False))
        responder = chat.ChatResponder(
            model=requested, stream=stream, text=kind == "text", stream_options=body.get("stream_options")
        )
        plan = self._planner(conv, max_tokens_of(body), stop_words_of(body))
        await self._run(responder, prompt, segments, plan, faults, conversation, send)

    async def _serve_messages(self, body: Any, faults: RequestFaults, conversation: str | None, send: Send) -> None:
        self.node.stats.messages_requests += 1
        if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
            await self._error(send, "messages", 400, "max_tokens: field required (an integer)")
            return
        try:
            conv = messages.messages_conversation(body)
        except TemplateError as exc:
            await self._error(send, "messages", 400, str(exc))
            return
        stop = [s for s in body.get("stop_sequences") or [] if isinstance(s, str) and s]
        responder = messages.MessagesResponder(
            model=str(body.get("model", self.config.model)), stream=bool(body.get("stream"))
        )
        plan = self._planner(conv, int(body["max_tokens"]), stop)
        prompt = render_prompt(conv)
        await self._run(responder, prompt, prompt_segments(conv, prompt), plan, faults, conversation, send)

    def _planner(self, conv: Conversation, max_tokens: int, stop: list[str]) -> Planner:
        config = self.config

        def make_plan(prompt_tokens: int, cached_tokens: int) -> TokenPlan:
            reply = write_reply(
                conv,
                node_id=config.name,
                reply_tokens=config.reply_tokens,
                reasoning=config.reasoning,
                prompt_tokens=prompt_tokens,
                cached_tokens=cached_tokens,
            )
            return plan_tokens(reply, max_tokens=max_tokens, stop=stop)

        return make_plan

    async def _run(
        self,
        responder: Responder,
        prompt: bytes,
        segments: list[Segment],
        make_plan: Planner,
        faults: RequestFaults,
        conversation: str | None,
        send: Send,
    ) -> None:
        """Generate and answer: stream events as they come, or one body at the end."""
        sent = 0  # data chunks streamed so far

        async def emit(chunks: list[bytes]) -> None:
            nonlocal sent
            for chunk in chunks:
                if faults.cut_after is not None and sent >= faults.cut_after:
                    if faults.cut_mode == "eof":
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        raise ResponseEnded
                    raise DropConnection(reset=True)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += 1

        events = self.node.generate(prompt, make_plan, conversation, segments)
        try:
            async for ev in events:
                if isinstance(ev, Piece):
                    if responder.stream:
                        await emit(responder.piece(ev))
                    else:
                        responder.piece(ev)
                        if faults.cut_after is not None and (ev.text or ev.tool_call):
                            sent += 1
                            if sent > faults.cut_after:
                                raise DropConnection
                elif isinstance(ev, Keepalive):
                    if responder.stream:
                        await send({"type": "http.response.body", "body": responder.keepalive(ev), "more_body": True})
                elif isinstance(ev, Started):
                    if responder.stream:
                        headers = [(b"Content-type", b"text/event-stream"), (b"Cache-Control", b"no-cache"), *CORS]
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                        if faults.garbage:
                            await send({"type": "http.response.body", "body": responder.garbage(), "more_body": True})
                        await emit(responder.started(ev))
                elif responder.stream:
                    await emit(responder.finished(ev))
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                else:
                    body = responder.garbage() if faults.garbage else responder.body(ev)
                    await send_response(send, 200, body, length=True)
        finally:
            await events.aclose()


def build_sim_app(config: SimConfig) -> SimApp:
    """The ASGI app of one simulated mlx_lm.server node.

    Several nodes can share one process and event loop (e.g. `mlxmux demo`), each with its own cache,
    slots, faults and counters; nothing is global::

        from proxy.sim.cli import make_server, serve_many
        from proxy.sim.config import SimConfig

        configs = [SimConfig(port=p, node_id=f"mac-{i}") for i, p in enumerate((8081, 8082))]
        await serve_many(configs)  # until SIGINT/SIGTERM, or pass stop=asyncio.Event()

        # or, next to other servers under your own signal handling:
        servers = [make_server(c, capture_signals=False) for c in configs]
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        ...
        for s in servers:
            s.should_exit = True

    (Servers made with `capture_signals=True` each install signal handlers; several in one loop stop one by one.)
    """
    return SimApp(config)


def _conversation(scope: Scope) -> str | None:
    """The conversation a request belongs to, for per-conversation counters: the test's own header
    first, else the session id a gateway forwards."""
    found: dict[bytes, bytes] = {k: v for k, v in scope["headers"] if k in CONVERSATION_HEADERS}
    for name in CONVERSATION_HEADERS:
        if name in found:
            return found[name].decode(errors="replace")
    return None


def _length_problem(scope: Scope) -> tuple[int, str] | None:
    """mlx reads exactly Content-Length bytes: without the header it answers 411, with a bad one 400."""
    length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if length is None:
        return 411, "Content-Length header is required"
    if not length.strip().isdigit():
        return 400, "Invalid Content-Length header"
    return None


def _json_error(raw: bytes) -> str:
    """Python's json error message for a body msgspec could not parse (mlx uses `json.loads`)."""
    try:
        json.loads(raw.decode(errors="replace"))
    except ValueError as exc:
        return str(exc)
    return "not valid JSON"
