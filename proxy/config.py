"""Settings: defaults < config file (TOML) < MLXMUX_* environment < command-line flags.

Decoded into msgspec structs that forbid unknown keys, so a typo in the config file is an
error naming the key. `ConfigError` carries one line for the user; the CLI prints it and exits 2.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

from proxy.environment import ENV_KEYS, variable_for
from state.redis_url import check_store_url
from state.types import CostWeights, Strategy


class ConfigError(Exception):
    """Invalid configuration; the message is one line meant for the user."""


# Ranges of numeric settings, checked when the configuration is decoded, so that a bad value stops the gateway
# with a line naming its path (`server.port must be 1..65535, not 99999`) instead of misbehaving: a port that
# wraps around, probes in a busy loop, a negative TTL that ends every binding at once.
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=1)]
"""At least one."""
CountOrOff = Annotated[int, msgspec.Meta(ge=0)]
"""0 turns the limit off (or means none)."""
Seconds = Annotated[float, msgspec.Meta(gt=0)]
SecondsOrOff = Annotated[float, msgspec.Meta(ge=0)]
"""0 turns the limit off (or means at once)."""
Interval = Annotated[float, msgspec.Meta(ge=0.1)]
"""A period of background work: below 0.1 s it is a busy loop (an interval of 0 made 1,168 probes in 6 s)."""


class NodeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One inference node (an mlx_lm.server, llama-server, vLLM, LM Studio …)."""

    url: str
    id: str = ""
    """Stable name for logs, bindings and `mlxmux status`; defaults to host:port of the URL."""
    model: str | None = None
    """The model id the node serves, sent upstream; None omits `model` (mlx_lm.server uses its loaded one)."""
    pool: str = "default"
    """Pool of interchangeable nodes; the model map sends a requested model name to a pool."""
    protocol: Literal["openai", "anthropic"] = "openai"
    """openai = chat completions (translated); anthropic = native /v1/messages (passed through)."""
    max_concurrency: Count = 4
    cache_slots: Count = 10
    """Prompts the node's cache holds (mlx_lm.server --prompt-cache-size, default 10)."""
    images: bool = False
    """True if the node's model takes images; otherwise images become a text placeholder."""
    late_system: Literal["user", "system"] = "user"
    """How a `role: system` message after the first message is sent: as a user message wrapped in
    <system-reminder> (default: Qwen and most chat templates reject late system messages), or as is."""
    api_key: str | None = None
    """Sent upstream as `Authorization: Bearer …`; never logged or echoed."""
    prompt_order: Literal["system-first", "tools-first"] = "system-first"
    """The order the node's chat template renders the system prompt and the tools (Qwen, Llama, GLM: system
    first). Prompts are hashed in this order, so it must match for prefix routing (docs/routing.md)."""
    context_window: Count | None = None
    """Tokens the node's model holds (prompt + reply); None = the pool's `context_window`, else unchecked.
    Longer prompts go to nodes that hold them, or get Anthropic's `prompt is too long` 400 (mlx_lm.server
    does not check and serves them badly)."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8420
    max_body_bytes: Count = 32 * 1024 * 1024
    body_timeout_s: Seconds = 30.0
    """A request body not wholly received in this long gets 400 and its connection is closed (slow clients)."""
    max_header_bytes: Count = 64 * 1024
    """Requests whose header names and values add up to more get 431 (uvicorn sets no limit of its own)."""
    max_messages: Count = 100_000
    """More messages in one request get 400 (the Anthropic API's own limit)."""
    max_tools: CountOrOff = 10_000
    """More tools in one request get 400."""
    max_answer_bytes: Count = 64 * 1024 * 1024
    """The most a node may send as one non-streaming answer or one stream event; more fails the request."""
    max_tokens_cap: Count = 32768
    """Upper bound on max_tokens sent to a node (Claude Code asks for 32000–64000)."""
    ping_interval_s: Interval = 10.0
    """An `event: ping` goes to the client when it has heard nothing for this long."""
    accept_wait_s: SecondsOrOff = 1.0
    """How long to wait for the node's response headers before sending message_start anyway."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    """json: every log line is one JSON object (docs/operations.md#metrics-and-logs)."""
    log_http: bool = False
    """true: httpx's own line for every request sent to a node (probes included: four lines a round)."""
    log_session_ids: Literal["hash", "plain", "off"] = "hash"
    """Session ids in access lines: sha256 (first 12 hex digits), as sent, or left out."""
    shutdown_grace_s: SecondsOrOff = 30.0
    """On SIGTERM: how long in-flight streams may run before the replica exits anyway."""
    admin_token: str | None = None
    """Bearer token for the admin API (/admin/…); unset = loopback clients only."""


class TimeoutConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    connect_s: Seconds = 3.0
    first_byte_s: Seconds = 600.0
    """Silence allowed before the node's first token: a cold 30k-token prefill on a Mac takes minutes."""
    between_chunks_s: Seconds = 120.0
    """Silence allowed once tokens flow (node keepalive comments count as sound)."""
    stream_deadline_s: SecondsOrOff = 1800.0
    """Longest a request (streaming or not, all its attempts) may take from its arrival, however busy the
    node looks: a node dribbling bytes or keepalives forever fails as a node timeout. 0 = no deadline."""


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    strategy: Strategy = Strategy.CACHE_AWARE
    weights: CostWeights = CostWeights()
    session_ttl_s: Seconds = 1800.0
    lease_ttl_s: Seconds = 60.0
    prefix_ttl_s: Seconds = 3600.0
    block_size: Count = 1024
    max_blocks_per_node: Count = 4096
    max_request_blocks: Count = 1024
    """Blocks of one prompt hashed, matched and recorded (1 MiB at the default block size)."""
    cache_feedback: bool = True
    """Correct the model of each node's cache from the `cached_tokens` every answer reports (docs/routing.md);
    off, the router believes where it sent prompts (for comparison: bench/real_routing.py)."""
    session_active_s: SecondsOrOff = 600.0
    """A bound session counts against its node's cache while its last turn is this recent."""
    max_attempts: Count = 3
    """Nodes tried for one request before giving up (only before any content reached the client)."""
    join_resends: bool = True
    """A streamed request identical to one in flight (same session, model, prompt) joins its answer instead of
    making a node compute it again (docs/architecture.md, "Resends join the answer in flight")."""
    resend_grace_s: SecondsOrOff = 1.5
    """When a client leaves, how long its answer goes on for a resend to join before the node's request is
    cancelled (Claude Code resends about half a second after giving up)."""
    retry_after_s: CountOrOff = 10
    """Retry-After sent with 503 cluster_unavailable."""
    key_prefix: str = "mlxmux:"


class HealthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    interval_s: Interval = 5.0
    """Seconds between probe rounds (each node is probed by one replica per round)."""
    timeout_s: Seconds = 3.0
    fail_threshold: Count = 2
    """Failed probes in a row that take a node out (breaker open)."""
    pass_threshold: Count = 1
    """Passed probes in a row that make a degraded node healthy again."""
    request_fail_threshold: Count = 3
    """Failed real requests in a row (5xx, timeouts, cut streams) that take a node out."""
    open_s: Seconds = 5.0
    """First wait before a node that is out is probed again; doubles per failed trial."""
    max_backoff_s: Seconds = 60.0
    offline_after_s: SecondsOrOff = 60.0
    """A node out this long is reported `offline`."""
    slow_first_token_s: SecondsOrOff = 180.0
    """A request whose first token took longer than this marks its node `degraded` (0 = never)."""


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Team API keys and fair share (docs/operations.md#team-keys-and-fair-share)."""

    keys: dict[str, str] = msgspec.field(default_factory=dict)
    """Key name (a teammate) -> API key, or `sha256:<64 hex>` of it. Empty: /v1/* is open to anyone."""
    max_concurrent_per_key: CountOrOff = 0
    """Requests one key may have in flight on POST /v1/messages, across all replicas; 0 = unlimited."""
    retry_after_s: CountOrOff = 5
    """Retry-After sent with 429 rate_limit_error."""

    def __post_init__(self) -> None:
        for name, key in self.keys.items():
            if not name or not key:
                raise ValueError("auth keys need a name and a non-empty key")
            if key.startswith("sha256:"):
                digest = key[len("sha256:") :]
                if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                    raise ValueError(f"auth key {name!r}: sha256: must be followed by 64 hex digits")


def parse_api_keys(spec: str) -> dict[str, str]:
    """`name:key,name:key` (MLXMUX_API_KEYS) -> {name: key}; a key may be `sha256:<hex>`."""
    keys: dict[str, str] = {}
    for number, item in enumerate((part.strip() for part in spec.split(",")), start=1):
        if not item:
            continue
        name, sep, key = item.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:  # the entry itself is not echoed: it may be a bare key
            raise ConfigError(f"MLXMUX_API_KEYS: entry {number} is not name:key")
        if name in keys:
            raise ConfigError(f"MLXMUX_API_KEYS: the name {name!r} appears twice")
        keys[name] = key
    return keys


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class DiscoveryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where nodes beyond `nodes` come from (docs/discovery.md); the node fields below apply to each one found."""

    mode: Literal["static", "dns", "kubernetes"] = "static"
    """static: only `nodes`; dns: every A/AAAA record of `dns_name`; kubernetes: a Service's EndpointSlices."""
    interval_s: Interval = 10.0
    dns_name: str = ""
    port: Port = 8080
    """Port of the nodes found by dns (and by kubernetes when a slice names no port)."""
    scheme: Literal["http", "https"] = "http"
    service: str = ""
    namespace: str = ""
    """Empty: the pod's own namespace (the `namespace` file beside `token_file`)."""
    port_name: str = ""
    """EndpointSlice port to use; empty: the slice's first port."""
    api_server: str = ""
    """Empty: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT."""
    token_file: str = f"{SERVICE_ACCOUNT_DIR}/token"
    ca_file: str = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    pool: str = "default"
    model: str | None = None
    protocol: Literal["openai", "anthropic"] = "openai"
    max_concurrency: Count = 4
    cache_slots: Count = 10
    images: bool = False
    late_system: Literal["user", "system"] = "user"
    api_key: str | None = None
    context_window: Count | None = None

    def __post_init__(self) -> None:
        # Raised as ValueError so msgspec reports it with its path, like any other bad value.
        if self.mode == "dns" and not self.dns_name:
            raise ValueError('discovery mode "dns" needs dns_name (MLXMUX_DISCOVERY_DNS_NAME)')
        if self.mode == "kubernetes" and not self.service:
            raise ValueError('discovery mode "kubernetes" needs service (MLXMUX_DISCOVERY_SERVICE)')


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Settings shared by the nodes of one pool (`[pools.NAME]`); a node's own value wins."""

    context_window: Count | None = None
    """Tokens each node of the pool holds (see NodeConfig.context_window)."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    timeouts: TimeoutConfig = msgspec.field(default_factory=TimeoutConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    nodes: list[NodeConfig] = msgspec.field(default_factory=list)
    models: dict[str, str] = msgspec.field(default_factory=dict)
    """Model map: glob pattern of a requested model name → pool. Unmatched names go to `default`."""
    pools: dict[str, PoolConfig] = msgspec.field(default_factory=dict)
    redis_url: str | None = None

    def pool_for(self, model: str) -> str:
        for pattern, pool in self.models.items():
            if fnmatch.fnmatchcase(model, pattern):
                return pool
        return "default"


def pool_windows(settings: Settings) -> dict[str, int]:
    """Pool -> the context window its `[pools.NAME]` table declares for nodes that declare none."""
    return {name: pool.context_window for name, pool in settings.pools.items() if pool.context_window is not None}


def redact_url(url: str) -> str:
    """The URL with any user:password replaced by `***` (for /cluster and logs)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


# The user:password@ of a URL inside any text, up to its last `@` before the path (a raw `@` may sit in a password).
_USERINFO = re.compile(r"(?<=://)[^/?#\s\"\\<>]*@")


def redact_credentials(text: str) -> str:
    """`text` with the user:password of every URL in it replaced by `***` (error messages, log lines)."""
    return _USERINFO.sub("***@", text) if "://" in text and "@" in text else text


def parse_node(spec: str) -> NodeConfig:
    """`URL` or `ID=URL` (as given to --node / MLXMUX_NODES)."""
    spec = spec.strip()
    node_id, sep, url = spec.partition("=")
    if not sep or "://" in node_id:
        node_id, url = "", spec
    return NodeConfig(url=url, id=node_id)


def normalize_node(node: NodeConfig) -> NodeConfig:
    """Check a node's URL and limits; strip a trailing /v1; default its id to host:port."""
    parts = urlsplit(node.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"node url {redact_url(node.url)!r} is not an http(s) URL (expected e.g. http://mac1:8080)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"node url {redact_url(node.url)!r}: {exc}") from None
    url = node.url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if port == 0:
        raise ConfigError(f"node url {redact_url(node.url)!r}: port 0 is no port a node can listen on")
    node_id = node.id or f"{parts.hostname}:{port or (443 if parts.scheme == 'https' else 80)}"
    return msgspec.structs.replace(node, url=url, id=node_id)


def _decode(data: Mapping[str, Any], source: str) -> Settings:
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(out_of_range(str(exc), data) or f"{source}: {exc}{_variable_hint(str(exc))}") from None


def _variable_hint(message: str) -> str:
    """` (MLXMUX_PORT)` when msgspec's message is about a setting an environment variable sets."""
    match = re.search(r" - at `\$\.([^`]+)`$", message)
    var = variable_for(match[1]) if match else None
    return f" ({var})" if var else ""


# msgspec's words for a value outside a Meta constraint: "Expected `int` <= 65535 - at `$.server.port`".
_CONSTRAINT = re.compile(r"Expected `(?:int|float)` (?:>=|>|<=|<) \S+ - at `\$\.(?P<path>[^`]+)`")


def out_of_range(message: str, data: Mapping[str, Any]) -> str | None:
    """msgspec's message about a number outside its range, as one line naming the setting, its allowed range,
    the value given and the variable that sets it: `server.port must be 1..65535, not 99999 (MLXMUX_PORT)`.
    None for any other message."""
    match = _CONSTRAINT.fullmatch(message)
    if match is None:
        return None
    path = match["path"]
    steps = [int(step) if step.isdigit() else step for step in re.findall(r"[^.\[\]]+", path)]
    value: Any = data
    kind: Any = msgspec.inspect.type_info(Settings)
    for step in steps:
        value = value[step] if isinstance(value, dict | list) else None
        if isinstance(kind, msgspec.inspect.StructType):
            kind = next((f.type for f in kind.fields if f.name == step), None)
        elif isinstance(kind, msgspec.inspect.ListType):
            kind = kind.item_type
    if not isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        return None
    name = re.sub(r"\[(\d+)\]", r"[\1]", path)
    if name.startswith("nodes[") and isinstance(data.get("nodes"), list):
        node = data["nodes"][int(steps[1])] if len(steps) > 1 else {}
        name = f"node {node.get('id') or node.get('url')!r}: {steps[-1]}" if isinstance(node, dict) else name
    var = variable_for(path)
    where = f" ({var})" if var else ""
    return f"{name} must be {_range(kind)}, not {value}{where}"


def _range(kind: msgspec.inspect.IntType | msgspec.inspect.FloatType) -> str:
    low = f"{kind.ge:g}" if kind.ge is not None else None
    high = f"{kind.le:g}" if kind.le is not None else None
    if low is not None and high is not None:
        return f"{low}..{high}"
    if kind.gt is not None:
        return f"> {kind.gt:g}"
    return f">= {low}" if low is not None else f"<= {high}"


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r}: {exc.strerror}") from None


def _set(data: dict[str, Any], section: str | None, key: str, value: Any) -> None:
    if section is None:
        data[key] = value
    else:
        data.setdefault(section, {})[key] = value


def load_settings(
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str | None, str], Any] | None = None,
    nodes: list[str] | None = None,
) -> Settings:
    """Build Settings from a TOML file, MLXMUX_* variables and explicit overrides (flags), in that order."""
    env = os.environ if env is None else env
    config_file = config_file or env.get("MLXMUX_CONFIG") or None
    data: dict[str, Any] = load_file(config_file) if config_file else {}
    source = config_file or "configuration"
    for var, (section, key) in ENV_KEYS.items():
        if env.get(var):
            _set(data, section, key, env[var])
    for (section, key), value in (overrides or {}).items():
        if value is not None:
            _set(data, section, key, value)
    if env.get("MLXMUX_API_KEYS"):
        _set(data, "auth", "keys", parse_api_keys(env["MLXMUX_API_KEYS"]))
    specs = nodes or [s for s in env.get("MLXMUX_NODES", "").split(",") if s.strip()]
    if specs:
        data["nodes"] = [msgspec.to_builtins(parse_node(s)) for s in specs]
    settings = _decode(data, source)
    finished = [normalize_node(n) for n in settings.nodes]
    seen: set[str] = set()
    for n in finished:
        if n.id in seen:
            raise ConfigError(f"two nodes share the id {n.id!r}; give them distinct ids with ID=URL")
        seen.add(n.id)
    if settings.redis_url:
        try:
            check_store_url(settings.redis_url)
        except ValueError as exc:
            shown = redact_url(settings.redis_url.partition("?")[0])  # the query may hold sentinel_password
            raise ConfigError(f"redis url {shown!r}: {exc}") from None
    return msgspec.structs.replace(settings, nodes=finished)
