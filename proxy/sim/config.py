"""Configuration of one simulated node (`mlxmux sim-node` flags map one to one onto `SimConfig`)."""

from __future__ import annotations

from typing import Literal

import msgspec

from proxy.sim.faults import Faults

DEFAULT_MODEL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"


class SimConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One simulated mlx_lm.server.

    - `node_id`: named in every reply ("Hello from sim node X"); empty means `sim-<port>`.
    - `model`: the id it serves; a request naming another model gets 404.
    - `prompt_cache_size`: LRU entries, like mlx's `--prompt-cache-size` (default 10).
    - `prefill_tps`: uncached prompt tokens per second (0 = instant); `prefill_step_size`: tokens per
      prefill step, one `: keepalive N/M` comment per step (mlx's default step is 2048).
    - `token_delay_ms`: time per generated token; `reply_tokens`: length of the default reply.
    - `parallel`: generations at once; more requests wait for a slot.
    - `reasoning`: emit `delta.reasoning` before the answer.
    - `anthropic`: also serve `POST /v1/messages` natively.
    - `http`: "1.0" (default) speaks like mlx_lm.server's `BaseHTTPRequestHandler`: an `HTTP/1.0` status
      line, one request per connection, bodies without a length end when the server closes
      (`proxy.sim.http10`); "1.1" serves the same app with uvicorn (keep-alive, chunked streams).
    - `close_delay_ms`: with HTTP/1.0, how long after a response's last byte the connection is closed.
    - `empty_models`: `GET /v1/models` answers 200 with an empty body (mlx-lm 0.32.2 without a Hugging Face
      cache folder).
    - `faults`: initial faults (see `proxy.sim.faults.Faults`).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    node_id: str = ""
    model: str = DEFAULT_MODEL
    prompt_cache_size: int = 10
    prefill_tps: float = 4000.0
    prefill_step_size: int = 2048
    token_delay_ms: float = 5.0
    reply_tokens: int = 48
    parallel: int = 4
    reasoning: bool = False
    anthropic: bool = False
    http: Literal["1.0", "1.1"] = "1.0"
    close_delay_ms: float = 5.0
    empty_models: bool = False
    faults: Faults = msgspec.field(default_factory=Faults)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, not {self.port}")
        if self.close_delay_ms < 0:
            raise ValueError("close_delay_ms must be >= 0")
        if self.prompt_cache_size < 0:
            raise ValueError("prompt_cache_size must be >= 0")
        if self.prefill_tps < 0 or self.token_delay_ms < 0:
            raise ValueError("prefill_tps and token_delay_ms must be >= 0")
        if self.prefill_step_size < 1 or self.parallel < 1 or self.reply_tokens < 1:
            raise ValueError("prefill_step_size, parallel and reply_tokens must be >= 1")

    @property
    def name(self) -> str:
        """The node id shown in replies and stats."""
        return self.node_id or f"sim-{self.port}"
