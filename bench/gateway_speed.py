"""How much mlxmux adds to a Claude Code request, and how it compares with LiteLLM's proxy.

    python bench/gateway_speed.py             # full run (a few minutes)
    python bench/gateway_speed.py --quick     # smoke run (well under a minute plus LiteLLM's start-up)

One run starts a fast simulated mlx_lm.server (`mlxmux sim-node`: instant prefill, no per-token delay,
a short reply), one `mlxmux serve` process (one uvicorn worker, loopback) in front of it and, when it
is installed, one LiteLLM proxy (one worker) in front of the same node. It then measures, with the
same Claude-Code-shaped body (`tests/claude_code_request.py`: ~80 KB, 24 tools, ~6 KB system prompt):

1. time to first token, one request at a time, the targets interleaved round by round:
   - the node directly, with the OpenAI body the gateway itself would send (same translation code):
     time until the first chunk carrying content;
   - mlxmux and LiteLLM with the Anthropic body: time until the first `content_block_delta`
     (mlxmux sends `message_start` before the node has answered, so that event is not counted);
2. throughput with 8 concurrent streams for a fixed time (the targets taking turns in slices): completed
   requests per second and errors.

LiteLLM is looked for at $MLXMUX_BENCH_LITELLM, then `.bench-venv/bin/litellm` in this checkout, then
`/tmp/litellm-venv/bin/litellm`. Without it the mlxmux parts still run and LiteLLM is reported as not
measured. The load generator is this process (httpx over real sockets); it shares the machine's CPUs
with the servers it measures, which on a small machine lowers every throughput figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout: `python bench/gateway_speed.py`

import httpx  # noqa: E402
import msgspec  # noqa: E402

from proxy.translate import encode_chat_request, to_chat_request  # noqa: E402
from proxy.wire.anthropic import decode_messages_request  # noqa: E402
from tests.claude_code_request import claude_code_request  # noqa: E402
from tests.procs import Proc, free_port, wait_http_ok  # noqa: E402
from tests.procs import mlxmux as mlxmux_proc  # noqa: E402

CLAUDE_MODEL = "claude-sonnet-4-5"
SIM_MODEL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"  # the sim node's default model id
# The fastest node the sim can be: no prefill time, no per-token delay, a reply of a few tokens.
SIM_FLAGS = ("--prefill-tps", "0", "--token-delay-ms", "0", "--reply-tokens", "1", "--parallel", "16")
MAX_TOKENS = 16  # the request's max_tokens: keeps each answer to 16 small chunks
CONCURRENCY = 8
TTFT_TARGET_MS = 3.0
RATIO_TARGET = 8.0
VENV_HINT = "python -m venv .bench-venv && .bench-venv/bin/pip install 'litellm[proxy]'"
HEADERS = {"content-type": "application/json", "x-api-key": "bench", "anthropic-version": "2023-06-01"}


# -- what one request measures ----------------------------------------------------------------------------------


class BadResponse(Exception):
    """The target answered, but not with a complete, successful stream."""


@dataclass(slots=True)
class Timing:
    ttft_ms: float
    total_ms: float


def _openai_content_seen(buf: bytes) -> bool:
    """True once an SSE `data:` event in `buf` carries generated content (text, reasoning or a tool call)."""
    for event in buf.split(b"\n\n")[:-1]:  # the last piece may be incomplete
        for line in event.split(b"\n"):
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            try:
                chunk = json.loads(line[5:])
            except ValueError:
                continue
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"):
                    return True
    return False


def _anthropic_content_seen(buf: bytes) -> bool:
    return b"event: content_block_delta" in buf or b'"type":"content_block_delta"' in buf


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to measure: where to POST, what, and how to spot the first token and a proper end."""

    name: str
    url: str
    body: bytes
    content_seen: Callable[[bytes], bool]
    end_marker: bytes
    note: str = ""
    headers: dict[str, str] = field(default_factory=lambda: dict(HEADERS))


async def one_request(client: httpx.AsyncClient, target: Target) -> Timing:
    """Send one streaming request; time to first content and to the end of the stream."""
    start = time.perf_counter()
    first: float | None = None
    head = bytearray()  # everything up to the first content
    tail = b""  # the last bytes, to check the stream ended properly
    async with client.stream("POST", target.url, content=target.body, headers=target.headers) as response:
        if response.status_code != 200:
            detail = (await response.aread())[:300].decode("utf-8", "replace")
            raise BadResponse(f"HTTP {response.status_code}: {detail}")
        async for chunk in response.aiter_raw():
            if first is None:
                head += chunk
                if target.content_seen(bytes(head)):
                    first = time.perf_counter()
                tail = bytes(head[-200:])
            else:
                tail = (tail + chunk)[-200:]
    end = time.perf_counter()
    if first is None:
        raise BadResponse(f"no content in the stream: {bytes(head[:300])!r}")
    if target.end_marker not in tail:
        raise BadResponse(f"stream did not end with {target.end_marker!r}: …{tail!r}")
    return Timing((first - start) * 1000, (end - start) * 1000)


def new_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY * 2)
    return httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits)


# -- the two measurements ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class TTFTResult:
    samples: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""


async def measure_ttft(targets: list[Target], requests: int, warmup: int) -> dict[str, TTFTResult]:
    """Sequential requests, the targets interleaved each round (rotating who goes first) so drift hits all alike."""
    results = {t.name: TTFTResult() for t in targets}
    clients = {t.name: new_client() for t in targets}
    try:
        for t in targets:
            for _ in range(warmup):
                with contextlib.suppress(BadResponse, httpx.HTTPError):
                    await one_request(clients[t.name], t)
        for i in range(requests):
            for k in range(len(targets)):
                t = targets[(i + k) % len(targets)]
                try:
                    results[t.name].samples.append((await one_request(clients[t.name], t)).ttft_ms)
                except (BadResponse, httpx.HTTPError) as exc:
                    results[t.name].errors += 1
                    results[t.name].last_error = f"{type(exc).__name__}: {exc}"
    finally:
        for c in clients.values():
            await c.aclose()
    return results


@dataclass(slots=True)
class LoadResult:
    completed: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    last_error: str = ""

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s else 0.0


async def _load_slice(client: httpx.AsyncClient, target: Target, seconds: float, result: LoadResult) -> None:
    """CONCURRENCY workers, each sending one request after another until `seconds` have passed."""
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                result.latencies_ms.append((await one_request(client, target)).total_ms)
                result.completed += 1
            except (BadResponse, httpx.HTTPError) as exc:
                result.errors += 1
                result.last_error = f"{type(exc).__name__}: {exc}"

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    result.elapsed_s += time.perf_counter() - start  # includes the requests still running at the deadline


async def measure_load(targets: list[Target], duration: float, slices: int, warmup: float) -> dict[str, LoadResult]:
    """`duration` seconds of load per target, cut into `slices` slices, the targets taking turns slice by slice.

    Taking turns spreads the machine's drift (other tenants, CPU frequency) over every target alike.
    """
    clients = {t.name: new_client() for t in targets}
    results = {t.name: LoadResult() for t in targets}
    try:
        for t in targets:
            await _load_slice(clients[t.name], t, warmup, LoadResult())
        for _ in range(slices):
            for t in targets:
                await _load_slice(clients[t.name], t, duration / slices, results[t.name])
    finally:
        for c in clients.values():
            await c.aclose()
    return results


# -- the processes ----------------------------------------------------------------------------------------------


def find_litellm() -> str | None:
    candidates = [os.environ.get("MLXMUX_BENCH_LITELLM", ""), str(ROOT / ".bench-venv/bin/litellm")]
    candidates.append("/tmp/litellm-venv/bin/litellm")
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def litellm_version(binary: str) -> str:
    python = Path(binary).parent / "python"
    if not python.exists():
        return "unknown version"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (subprocess.SubprocessError, OSError):
        return "unknown version"
    return out.stdout.strip() or "unknown version"


def litellm_config(sim_url: str) -> str:
    return "\n".join(
        [
            "model_list:",
            f"  - model_name: {CLAUDE_MODEL}",
            "    litellm_params:",
            f"      model: hosted_vllm/{SIM_MODEL}",
            f"      api_base: {sim_url}/v1",
            "      api_key: none",
            "litellm_settings:",
            "  drop_params: true",
            "  telemetry: false",
            "",
        ]
    )


def start_litellm(binary: str, sim_url: str, master_key: str, stack: contextlib.ExitStack) -> Proc:
    config = Path(tempfile.mkstemp(prefix="mlxmux-bench-litellm-", suffix=".yaml")[1])
    stack.callback(config.unlink, missing_ok=True)
    config.write_text(litellm_config(sim_url))
    port = free_port()
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # do not fetch the price list from the internet at start-up
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_MASTER_KEY": master_key,  # recent LiteLLM refuses to start without one
    }
    args = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    proc = stack.enter_context(Proc(args, port=port, env=env, name="litellm"))
    proc.wait_ready(timeout=180)
    wait_http_ok(proc.url + "/health/liveliness", timeout=60)
    return proc


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the `finally` blocks stop every child process."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the request bodies -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bodies:
    anthropic: bytes
    openai: bytes  # what mlxmux sends the node for `anthropic`
    tools: int
    system_bytes: int


def make_bodies() -> Bodies:
    body = claude_code_request(str(uuid.UUID(int=7)), turns=1, model=CLAUDE_MODEL, max_tokens=MAX_TOKENS)
    raw = json.dumps(body, separators=(",", ":")).encode()
    # The same translation the gateway applies (proxy/messages.py `prepare` and `upstream_request`
    # for a node with no configured model id and no images), encoded the same way.
    chat = to_chat_request(decode_messages_request(raw), model_id=None, max_tokens_cap=32768)
    system = sum(len(b["text"].encode()) for b in body["system"])
    return Bodies(raw, encode_chat_request(chat), len(body["tools"]), system)


def litellm_openai_body(bodies: Bodies) -> bytes:
    """The translated body with a model name LiteLLM routes on (fallback when its /v1/messages fails)."""
    data = msgspec.json.decode(bodies.openai)
    data["model"] = CLAUDE_MODEL
    return msgspec.json.encode(data)


# -- report -----------------------------------------------------------------------------------------------------


def quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p90)."""
    if len(values) == 1:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[4], deciles[8]


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_ttft(targets: list[Target], results: dict[str, TTFTResult], requests: int) -> None:
    print(f"1) Time to first token: {requests} sequential requests per target, interleaved round by round")
    for t in targets:
        print(f"   {t.name:<8} {t.note}")
    print()
    print(f"   {'target':<8} {'p50 ms':>8} {'p90 ms':>8} {'min ms':>8} {'samples':>8} {'errors':>7}")
    p50: dict[str, float] = {}
    for t in targets:
        r = results[t.name]
        if r.samples:
            a, b = quantiles(r.samples)
            p50[t.name] = a
            print(f"   {t.name:<8} {a:8.2f} {b:8.2f} {min(r.samples):8.2f} {len(r.samples):8d} {r.errors:7d}")
        else:
            print(f"   {t.name:<8} {'-':>8} {'-':>8} {'-':>8} {0:8d} {r.errors:7d}")
        if r.errors:
            print(f"            last error: {r.last_error[:200]}")
    print()
    if "direct" in p50:
        for name in ("mlxmux", "litellm"):
            if name in p50:
                diff = p50[name] - p50["direct"]
                line = f"   {name} p50 − direct p50 = {diff:+.2f} ms"
                if name == "mlxmux":
                    line += f"  (target ≤ {TTFT_TARGET_MS:g} ms: {verdict(diff <= TTFT_TARGET_MS)})"
                print(line)
    print()


def print_load(results: dict[str, LoadResult], duration: float, slices: int, litellm_missing: str) -> None:
    print(
        f"2) Throughput: {CONCURRENCY} concurrent streams, {duration:g} s per target"
        f" in {slices} slices of {duration / slices:g} s, the targets taking turns"
    )
    print()
    print(f"   {'target':<8} {'req/s':>8} {'completed':>10} {'errors':>7} {'p50 ms':>8} {'p90 ms':>8}")
    for name, r in results.items():
        if r.latencies_ms:
            a, b = quantiles(r.latencies_ms)
            print(f"   {name:<8} {r.rps:8.1f} {r.completed:10d} {r.errors:7d} {a:8.1f} {b:8.1f}")
        else:
            print(f"   {name:<8} {r.rps:8.1f} {r.completed:10d} {r.errors:7d} {'-':>8} {'-':>8}")
        if r.errors:
            print(f"            last error: {r.last_error[:200]}")
    if litellm_missing:
        print(f"   {'litellm':<8} {'not measured':>12}  ({litellm_missing})")
    print("   (p50/p90 ms: whole request, send to end of stream, under load)")
    print()
    mine, theirs = results.get("mlxmux"), results.get("litellm")
    if mine and theirs and theirs.rps > 0:
        ratio = mine.rps / theirs.rps
        print(
            f"   mlxmux / litellm = {mine.rps:.1f} / {theirs.rps:.1f} req/s = {ratio:.1f}×"
            f"  (target ≥ {RATIO_TARGET:g}×: {verdict(ratio >= RATIO_TARGET)})"
        )
    else:
        print("   mlxmux / litellm: not measured")
    print()


# -- main -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Options:
    requests: int
    duration: float
    warmup_requests: int
    warmup_s: float
    slices: int
    litellm: bool


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python bench/gateway_speed.py",
        description="Time to first token and throughput: direct to a fast sim node, through mlxmux, through LiteLLM.",
        epilog=f"LiteLLM: set MLXMUX_BENCH_LITELLM=/path/to/litellm, or: {VENV_HINT}",
    )
    p.add_argument("--requests", type=int, help="TTFT samples per target (default 200; --quick: 30)")
    p.add_argument("--duration", type=float, help="seconds of load per target (default 10; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="a short run: fewer samples, shorter load and warm-up")
    p.add_argument("--no-litellm", action="store_true", help="measure mlxmux only, even if LiteLLM is installed")
    args = p.parse_args(argv)
    requests = args.requests if args.requests is not None else (30 if args.quick else 200)
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    if requests < 1 or duration <= 0:
        p.error("--requests must be at least 1 and --duration positive")
    return Options(
        requests=requests,
        duration=duration,
        warmup_requests=5 if args.quick else 20,
        warmup_s=1.0 if args.quick else 3.0,
        slices=3 if args.quick else 5,
        litellm=not args.no_litellm,
    )


async def check(target: Target) -> str:
    """'' if one request to `target` streams properly, else what went wrong."""
    problem = ""
    async with new_client() as client:
        for _ in range(3):  # LiteLLM's first request after start-up can be slow or fail
            try:
                await one_request(client, target)
                return ""
            except (BadResponse, httpx.HTTPError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
    return problem


async def bench(opts: Options, stack: contextlib.ExitStack) -> None:
    bodies = make_bodies()
    port = free_port()
    node = stack.enter_context(mlxmux_proc("sim-node", "--port", str(port), *SIM_FLAGS, port=port, name="sim"))
    node.wait_ready()
    port = free_port()
    args = ("serve", "--port", str(port), "--node", f"bench={node.url}", "--log-level", "warning")
    gw = stack.enter_context(mlxmux_proc(*args, port=port, name="gateway"))
    gw.wait_ready()
    wait_http_ok(gw.url + "/ready", timeout=30)  # the node has passed its first health probe

    direct = Target(
        "direct",
        node.url + "/v1/chat/completions",
        bodies.openai,
        _openai_content_seen,
        b"data: [DONE]",
        "the sim node itself, the gateway's translated OpenAI body: first chunk with content",
    )
    mlxmux = Target(
        "mlxmux",
        gw.url + "/v1/messages",
        bodies.anthropic,
        _anthropic_content_seen,
        b"message_stop",
        "mlxmux serve (1 worker): first content_block_delta (its early message_start is not counted)",
    )
    targets = [direct, mlxmux]
    for t in targets:
        if problem := await check(t):
            raise SystemExit(f"{t.name} does not answer properly: {problem}")

    litellm_missing = ""
    binary = find_litellm() if opts.litellm else None
    version = ""
    if not opts.litellm:
        litellm_missing = "--no-litellm"
    elif binary is None:
        litellm_missing = "LiteLLM not installed"
        print("LiteLLM was not found (MLXMUX_BENCH_LITELLM, .bench-venv/bin/litellm, /tmp/litellm-venv/bin/litellm).")
        print(f"To compare with it: {VENV_HINT}")
        print("Measuring mlxmux only; LiteLLM is reported as not measured.")
        print()
    else:
        version = litellm_version(binary)
        print(f"starting LiteLLM {version} ({binary}) …", flush=True)
        key = "sk-bench-" + secrets.token_hex(16)
        proxy = start_litellm(binary, node.url, key, stack)
        auth = {**HEADERS, "x-api-key": key, "authorization": f"Bearer {key}"}
        messages = Target(
            "litellm",
            proxy.url + "/v1/messages",
            bodies.anthropic,
            _anthropic_content_seen,
            b"message_stop",
            "LiteLLM proxy (1 worker), /v1/messages → hosted_vllm: first content_block_delta",
            auth,
        )
        if (problem := await check(messages)) == "":
            targets.append(messages)
        else:
            print(f"LiteLLM's /v1/messages does not work here ({problem[:300]}); using its /v1/chat/completions")
            chat = Target(
                "litellm",
                proxy.url + "/v1/chat/completions",
                litellm_openai_body(bodies),
                _openai_content_seen,
                b"data: [DONE]",
                "LiteLLM proxy (1 worker), /v1/chat/completions with the translated OpenAI body (FALLBACK: "
                "its /v1/messages failed): first chunk with content",
                auth,
            )
            if (problem := await check(chat)) == "":
                targets.append(chat)
            else:
                litellm_missing = f"LiteLLM answers neither /v1/messages nor /v1/chat/completions: {problem[:200]}"
                print(litellm_missing)
        print()

    if litellm_missing:
        litellm_line = f"not measured ({litellm_missing})"
    else:
        litellm_line = f"LiteLLM {version} ({binary}), litellm --num_workers 1, model hosted_vllm/<sim model>"
    print_header(bodies, litellm_line)
    ttft = await measure_ttft(targets, opts.requests, opts.warmup_requests)
    print_ttft(targets, ttft, opts.requests)
    load = await measure_load(targets, opts.duration, opts.slices, opts.warmup_s)
    print_load(load, opts.duration, opts.slices, litellm_missing)


def print_header(bodies: Bodies, litellm: str) -> None:
    loop = "uvloop" if installed("uvloop") else "asyncio"
    http = "httptools" if installed("httptools") else "h11"
    print(f"mlxmux gateway speed, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, Python {platform.python_version()};"
        f" load average {load} before measuring;"
        " the load generator (this process, httpx), the sim node, mlxmux and LiteLLM all share these CPUs"
    )
    print(
        f"request: Claude-Code-shaped /v1/messages, {len(bodies.anthropic) / 1000:.1f} KB, {bodies.tools} tools, "
        f"{bodies.system_bytes / 1000:.1f} KB system prompt, max_tokens {MAX_TOKENS}; "
        f"translated OpenAI body {len(bodies.openai) / 1000:.1f} KB"
    )
    print(f"sim node: mlxmux sim-node {' '.join(SIM_FLAGS)}")
    print(f"mlxmux: mlxmux serve (this Python), 1 uvicorn worker, loop={loop}, http={http}, --log-level warning")
    print(f"litellm: {litellm}")
    print()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run  # a cheaper load generator
    except ImportError:
        runner = asyncio.run
    with sigterm_as_exit(), contextlib.ExitStack() as stack:
        try:
            runner(bench(opts, stack))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
