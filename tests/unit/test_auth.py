"""Team keys: parsing MLXMUX_API_KEYS and [auth], matching presented keys (plain and sha256:), which paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.auth import COUNT_TOKENS_POOL, KeyRing, is_loopback, needs_key, presented_keys, slot_pool, takes_slot
from proxy.config import ConfigError, load_settings, parse_api_keys

BOB_HASH = "sha256:" + hashlib.sha256(b"sk-bob").hexdigest()


@pytest.mark.parametrize(
    ("spec", "keys"),
    [
        ("alice:sk-a", {"alice": "sk-a"}),
        (" alice : sk-a , bob:sk-b ,", {"alice": "sk-a", "bob": "sk-b"}),
        (f"bob:{BOB_HASH}", {"bob": BOB_HASH}),  # split at the first colon only
        ("", {}),
    ],
)
def test_parse_api_keys(spec: str, keys: dict[str, str]) -> None:
    assert parse_api_keys(spec) == keys


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("sk-bare-key", "entry 1 is not name:key"),
        ("alice:sk-a,:sk-b", "entry 2 is not name:key"),
        ("alice:", "entry 1 is not name:key"),
        ("alice:a,alice:b", "'alice' appears twice"),
    ],
)
def test_bad_api_keys_name_the_entry_not_the_key(spec: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        load_settings(env={"MLXMUX_API_KEYS": spec})
    assert "sk-bare" not in str(info.value)


def test_keys_from_env_replace_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "mlxmux.toml"
    cfg.write_text(f'[auth]\nkeys = {{alice = "sk-a", bob = "{BOB_HASH}"}}\nmax_concurrent_per_key = 2\n')
    from_file = load_settings(config_file=str(cfg), env={}).auth
    assert (from_file.keys, from_file.max_concurrent_per_key, from_file.retry_after_s) == (
        {"alice": "sk-a", "bob": BOB_HASH},
        2,
        5,
    )
    env = {"MLXMUX_API_KEYS": "carol:sk-c", "MLXMUX_MAX_CONCURRENT_PER_KEY": "1"}
    from_env = load_settings(config_file=str(cfg), env=env).auth
    assert (from_env.keys, from_env.max_concurrent_per_key) == ({"carol": "sk-c"}, 1)
    assert load_settings(env={}).auth.keys == {}


@pytest.mark.parametrize(
    "toml",
    [
        '[auth]\nkeys = {bob = "sha256:abc"}\n',
        '[auth]\nkeys = {bob = "sha256:' + "g" * 64 + '"}\n',
        '[auth]\nkeys = {bob = ""}\n',
        "[auth]\nmax_concurrent_per_key = -1\n",
        "[auth]\nkey = {}\n",
    ],
)
def test_bad_auth_config(tmp_path: Path, toml: str) -> None:
    cfg = tmp_path / "mlxmux.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=r"auth"):
        load_settings(config_file=str(cfg), env={})


@pytest.mark.parametrize(
    ("presented", "name"),
    [
        (["sk-alice"], "alice"),
        (["sk-bob"], "bob"),  # configured as its hash
        ([BOB_HASH], None),  # the hash itself is not a key
        (["sk-alice "], None),
        (["wrong", "sk-bob"], "bob"),  # x-api-key and Bearer both sent: either may match
        ([], None),
        ([""], None),
    ],
)
def test_key_ring(presented: list[str], name: str | None) -> None:
    ring = KeyRing({"alice": "sk-alice", "bob": BOB_HASH.upper().replace("SHA256:", "sha256:")})
    assert ring.match(presented) == name
    assert not KeyRing({})


@pytest.mark.parametrize(
    ("headers", "keys"),
    [
        ([(b"x-api-key", b"sk-a")], ["sk-a"]),
        ([(b"authorization", b"Bearer sk-b")], ["sk-b"]),
        ([(b"authorization", b"bearer  sk-b ")], ["sk-b"]),
        ([(b"authorization", b"Basic c2stYg==")], []),
        ([(b"authorization", b"Bearer ")], []),
        ([(b"x-api-key", b"sk-a"), (b"authorization", b"Bearer sk-b")], ["sk-a", "sk-b"]),
        ([(b"content-type", b"application/json")], []),
    ],
)
def test_presented_keys(headers: list[tuple[bytes, bytes]], keys: list[str]) -> None:
    assert presented_keys(headers) == keys


@pytest.mark.parametrize(
    ("path", "needed"),
    [
        ("/v1/messages", True),
        ("/v1/messages/count_tokens", True),
        ("/v1/models", True),
        ("/v1/anything", True),
        ("/health", False),
        ("/ready", False),
        ("/", False),
        ("/api/hello", False),
        ("/cluster", False),
        ("/metrics", False),
        ("/admin/nodes", False),
        ("/v1x", False),
    ],
)
def test_which_paths_need_a_key(path: str, needed: bool) -> None:
    assert needs_key(path) is needed


def test_generation_and_count_tokens_take_slots_of_their_own_pools() -> None:
    assert takes_slot("POST", "/v1/messages") and slot_pool("POST", "/v1/messages") == ""
    # as large a body as generation: limited too, from its own pool so counting never blocks generation
    assert slot_pool("POST", "/v1/messages/count_tokens/") == COUNT_TOKENS_POOL
    assert not takes_slot("GET", "/v1/models")
    assert not takes_slot("GET", "/v1/messages")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("mac1.local", False)],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
