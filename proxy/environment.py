"""The `MLXMUX_*` environment variables: which exist, what each one sets, and the closest real name to a
misspelled one.

A variable nobody reads is silently ignored by the shell and by mlxmux alike, so a typo
(`MLXMUX_FIRST_BYTE_TIMEOUT` without `_S`) would leave the default in force without a word. `serve`
therefore warns at start-up about every `MLXMUX_*` name it does not know, naming the closest real one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

# Environment variable → (config section, key). MLXMUX_NODES, MLXMUX_API_KEYS and MLXMUX_CONFIG are read apart.
ENV_KEYS: dict[str, tuple[str | None, str]] = {
    "MLXMUX_HOST": ("server", "host"),
    "MLXMUX_PORT": ("server", "port"),
    "MLXMUX_MAX_BODY_BYTES": ("server", "max_body_bytes"),
    "MLXMUX_BODY_TIMEOUT_S": ("server", "body_timeout_s"),
    "MLXMUX_MAX_HEADER_BYTES": ("server", "max_header_bytes"),
    "MLXMUX_MAX_MESSAGES": ("server", "max_messages"),
    "MLXMUX_MAX_TOOLS": ("server", "max_tools"),
    "MLXMUX_MAX_ANSWER_BYTES": ("server", "max_answer_bytes"),
    "MLXMUX_MAX_TOKENS_CAP": ("server", "max_tokens_cap"),
    "MLXMUX_PING_INTERVAL_S": ("server", "ping_interval_s"),
    "MLXMUX_LOG_LEVEL": ("server", "log_level"),
    "MLXMUX_LOG_FORMAT": ("server", "log_format"),
    "MLXMUX_LOG_HTTP": ("server", "log_http"),
    "MLXMUX_LOG_SESSION_IDS": ("server", "log_session_ids"),
    "MLXMUX_ADMIN_TOKEN": ("server", "admin_token"),
    "MLXMUX_SHUTDOWN_GRACE_S": ("server", "shutdown_grace_s"),
    "MLXMUX_STRATEGY": ("routing", "strategy"),
    "MLXMUX_SESSION_TTL_S": ("routing", "session_ttl_s"),
    "MLXMUX_LEASE_TTL_S": ("routing", "lease_ttl_s"),
    "MLXMUX_MAX_ATTEMPTS": ("routing", "max_attempts"),
    "MLXMUX_JOIN_RESENDS": ("routing", "join_resends"),
    "MLXMUX_RESEND_GRACE_S": ("routing", "resend_grace_s"),
    "MLXMUX_CACHE_FEEDBACK": ("routing", "cache_feedback"),
    "MLXMUX_SESSION_ACTIVE_S": ("routing", "session_active_s"),
    "MLXMUX_KEY_PREFIX": ("routing", "key_prefix"),
    "MLXMUX_CONNECT_TIMEOUT_S": ("timeouts", "connect_s"),
    "MLXMUX_FIRST_BYTE_TIMEOUT_S": ("timeouts", "first_byte_s"),
    "MLXMUX_BETWEEN_CHUNKS_TIMEOUT_S": ("timeouts", "between_chunks_s"),
    "MLXMUX_STREAM_DEADLINE_S": ("timeouts", "stream_deadline_s"),
    "MLXMUX_HEALTH_INTERVAL_S": ("health", "interval_s"),
    "MLXMUX_HEALTH_TIMEOUT_S": ("health", "timeout_s"),
    "MLXMUX_FAIL_THRESHOLD": ("health", "fail_threshold"),
    "MLXMUX_REQUEST_FAIL_THRESHOLD": ("health", "request_fail_threshold"),
    "MLXMUX_OPEN_S": ("health", "open_s"),
    "MLXMUX_MAX_BACKOFF_S": ("health", "max_backoff_s"),
    "MLXMUX_OFFLINE_AFTER_S": ("health", "offline_after_s"),
    "MLXMUX_SLOW_FIRST_TOKEN_S": ("health", "slow_first_token_s"),
    "MLXMUX_DISCOVERY": ("discovery", "mode"),
    "MLXMUX_DISCOVERY_INTERVAL_S": ("discovery", "interval_s"),
    "MLXMUX_DISCOVERY_DNS_NAME": ("discovery", "dns_name"),
    "MLXMUX_DISCOVERY_PORT": ("discovery", "port"),
    "MLXMUX_DISCOVERY_SERVICE": ("discovery", "service"),
    "MLXMUX_DISCOVERY_NAMESPACE": ("discovery", "namespace"),
    "MLXMUX_REDIS_URL": (None, "redis_url"),
    "MLXMUX_MAX_CONCURRENT_PER_KEY": ("auth", "max_concurrent_per_key"),
}

READ_APART = frozenset({"MLXMUX_NODES", "MLXMUX_API_KEYS", "MLXMUX_CONFIG"})
"""Read by `load_settings` itself (lists, or where the configuration comes from)."""

OTHER_READERS = frozenset(
    {
        "MLXMUX_URL",  # mlxmux status / sessions / nodes: the gateway to ask
        "MLXMUX_REPLICAS",  # docker-compose.yml
        "MLXMUX_GATEWAY_DNS",  # deploy/haproxy.cfg
        "MLXMUX_LB_PORT",
        "MLXMUX_LB_CHECK_INTERVAL",
        "MLXMUX_SIM_ARGS",  # deploy/systemd/mlxmux-sim@.service
        "MLXMUX_BENCH_LITELLM",  # bench/gateway_speed.py
    }
)
"""Read by other parts of the project (the CLI's client commands, the deployment files, benchmarks): a gateway
started from the same shell must not call them misspelled."""

_OTHER_PATTERN = re.compile(r"MLXMUX_GW\d+")
"""deploy/haproxy.cfg's replica addresses, MLXMUX_GW1 … MLXMUX_GW10."""


def known_variables() -> frozenset[str]:
    """Every MLXMUX_* name some part of mlxmux reads."""
    return frozenset(ENV_KEYS) | READ_APART | OTHER_READERS


def is_known(name: str) -> bool:
    return name in known_variables() or bool(_OTHER_PATTERN.fullmatch(name))


def variable_for(path: str) -> str | None:
    """The variable that sets a config path such as `server.port` or `redis_url`, if one does."""
    for var, (section, key) in ENV_KEYS.items():
        if path == (key if section is None else f"{section}.{key}"):
            return var
    return None


def unknown_variables(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """Each `MLXMUX_*` name among `names` that nothing reads, with the closest known name (None when
    nothing is close), sorted by name. Suggestions come from the gateway's own settings first: a typo is
    far more often in those than in the deployment files' variables."""
    gateway_names = sorted(ENV_KEYS.keys() | READ_APART)
    found = []
    for name in sorted(n for n in names if n.startswith("MLXMUX_") and not is_known(n)):
        close = difflib.get_close_matches(name, gateway_names, n=1, cutoff=0.75)
        close = close or difflib.get_close_matches(name, sorted(OTHER_READERS), n=1, cutoff=0.75)
        found.append((name, close[0] if close else None))
    return found


def unknown_variable_warnings(env: Mapping[str, str]) -> list[str]:
    """One line per unknown MLXMUX_* variable in `env`, for the start-up log."""
    lines = []
    for name, close in unknown_variables(env):
        hint = f"did you mean {close}?" if close else "no mlxmux setting has a similar name (docs/configuration.md)"
        lines.append(f"environment variable {name} is not an mlxmux setting and is ignored: {hint}")
    return lines
