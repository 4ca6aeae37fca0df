"""Team keys and fair share, against real gateway processes, a slow sim node and (for replicas) a real Redis,
driven by the official anthropic SDK the way Claude Code authenticates (x-api-key or Bearer)."""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.fake_http import JsonHandler, serving
from tests.procs import Proc, free_port, gateway, sim_node

pytestmark = pytest.mark.slow

BOB_HASH = "sha256:" + hashlib.sha256(b"sk-bob").hexdigest()
ENV = {
    "MLXMUX_API_KEYS": f"alice:sk-alice,bob:{BOB_HASH}",
    "MLXMUX_MAX_CONCURRENT_PER_KEY": "1",
    "MLXMUX_HEALTH_INTERVAL_S": "0.5",
}
LONG = {"model": "claude-opus-4-8", "max_tokens": 256, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def node() -> Iterator[Proc]:
    """40 reply tokens at 50 ms each: a full answer stays in flight for about 2 s."""
    with sim_node("--id", "slow", "--token-delay-ms", "50", "--reply-tokens", "40", name="slow") as n:
        yield n


@pytest.fixture(scope="module")
def gw(node: Proc) -> Iterator[Proc]:
    with gateway(f"slow={node.url}", env=ENV) as g:
        yield g


def sdk(g: Proc, *, api_key: str | None = None, auth_token: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=g.url, api_key=api_key, auth_token=auth_token, max_retries=0, timeout=20)


def ask(client: anthropic.Anthropic) -> str:
    """A short request (2 tokens) that does not hold its slot for long."""
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    return msg.stop_reason or ""


@contextlib.contextmanager
def holding(g: Proc, key: str) -> Iterator[httpx.Response]:
    """A long streaming request by `key`, open (its slot held) until the block ends."""
    with (
        httpx.Client(timeout=20) as client,
        client.stream("POST", g.url + "/v1/messages", json=LONG, headers={"x-api-key": key}) as response,
    ):
        assert response.status_code == 200
        yield response


def eventually_ok(client: anthropic.Anthropic, timeout: float = 5.0) -> None:
    """The slot comes back once the previous request ended (its release is the middleware's last step)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ask(client)
            return
        except anthropic.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_api_key_and_bearer_token_both_work(gw: Proc) -> None:
    with sdk(gw, api_key="sk-alice") as alice, sdk(gw, auth_token="sk-bob") as bob:  # bob's key is stored hashed
        assert ask(alice) == "max_tokens"
        assert ask(bob) == "max_tokens"
        assert alice.messages.count_tokens(model="claude-opus-4-8", messages=[{"role": "user", "content": "x"}])
        assert any(m.id == "claude-opus-4-8" for m in bob.models.list())


@pytest.mark.parametrize("key", ["sk-wrong", "sk-alice-but-longer", BOB_HASH])
def test_a_wrong_key_is_an_authentication_error(gw: Proc, key: str) -> None:
    with sdk(gw, api_key=key) as client, pytest.raises(anthropic.AuthenticationError) as info:
        ask(client)
    assert info.value.status_code == 401
    assert info.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.response.headers["request-id"].startswith("req_")


def test_which_paths_need_a_key(gw: Proc) -> None:
    for method, path in (("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models")):
        r = httpx.request(method, gw.url + path, json=LONG, timeout=5)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    for path in ("/health", "/ready", "/", "/api/hello", "/cluster"):
        assert httpx.get(gw.url + path, timeout=5).status_code == 200, path
    assert httpx.get(gw.url + "/admin/nodes", timeout=5).status_code == 200  # admin: its own rules (loopback)


def test_one_key_at_its_limit_gets_429_while_another_key_is_served(gw: Proc) -> None:
    with sdk(gw, api_key="sk-alice") as alice, sdk(gw, auth_token="sk-bob") as bob:
        with holding(gw, "sk-alice") as stream:
            with pytest.raises(anthropic.RateLimitError) as info:
                ask(alice)
            assert info.value.status_code == 429
            assert info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
            assert info.value.response.headers["retry-after"] == "5"
            assert ask(bob) == "max_tokens"  # another teammate is not held up
            alice.messages.count_tokens(model="claude-opus-4-8", messages=[{"role": "user", "content": "x"}])
            body = stream.read()  # the whole stream: the slot is held until it ends
            assert b"event: message_stop" in body
        eventually_ok(alice)


def test_a_client_that_leaves_gives_its_slot_back(gw: Proc) -> None:
    with sdk(gw, api_key="sk-alice") as alice, holding(gw, "sk-alice") as stream:
        chunks = stream.iter_bytes()  # kept: dropping a half-read iterator closes the connection
        assert next(chunks).startswith(b"event: message_start")
        with pytest.raises(anthropic.RateLimitError):
            ask(alice)
        stream.close()  # the client hangs up mid-stream
        eventually_ok(alice, timeout=1.0)  # well before the 2 s the answer would have taken


@pytest.mark.redis
def test_the_limit_holds_across_replicas_sharing_redis(node: Proc, redis_url: str) -> None:
    env = {**ENV, "MLXMUX_REDIS_URL": redis_url, "MLXMUX_KEY_PREFIX": f"auth{uuid.uuid4().hex[:8]}:"}
    with (
        gateway(f"slow={node.url}", env=env) as one,
        gateway(f"slow={node.url}", env=env) as two,
        sdk(two, api_key="sk-alice") as alice_on_two,
        sdk(two, auth_token="sk-bob") as bob_on_two,
    ):
        with holding(one, "sk-alice") as stream:
            with pytest.raises(anthropic.RateLimitError):
                ask(alice_on_two)
            assert ask(bob_on_two) == "max_tokens"
            stream.read()
        eventually_ok(alice_on_two)


def test_an_open_gateway_on_the_network_warns(node: Proc) -> None:
    with gateway(f"slow={node.url}", extra=["--host", "0.0.0.0"]) as open_gw:
        assert "no API keys configured" in open_gw.output()
        assert httpx.get(open_gw.url + "/v1/models", timeout=5).status_code == 200  # open, as before
    with gateway(f"slow={node.url}", env=ENV, extra=["--host", "0.0.0.0"]) as closed:
        assert "no API keys configured" not in closed.output()


def test_an_unreachable_store_lets_requests_through(node: Proc) -> None:
    """Fair share fails open: a dead Redis must not turn into 429s (or 500s) for the whole team."""
    env = {**ENV, "MLXMUX_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with gateway(f"slow={node.url}", env=env) as g, sdk(g, api_key="sk-alice") as alice:
        with holding(g, "sk-alice") as stream:
            assert ask(alice) == "max_tokens"
            assert ask(alice) == "max_tokens"
            stream.read()
        with sdk(g, api_key="sk-wrong") as wrong, pytest.raises(anthropic.AuthenticationError):
            ask(wrong)  # keys are still checked: they need no store
        assert g.output().count("per-key concurrency limits are not enforced") == 1


def test_node_api_key_is_sent_upstream_and_never_shown() -> None:
    """A node behind auth (vLLM --api-key, a proxy): the gateway sends its key as a Bearer token, and
    the key appears in no answer, no operator view and no log line."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    seen: list[str | None] = []
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }

    class Node(JsonHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("authorization"))
            self.reply(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self) -> None:
            seen.append(self.headers.get("authorization"))
            self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("authorization") != "Bearer node-secret-123":
                self.reply(401, {"error": {"message": "bad key"}})
            else:
                self.reply(200, completion)

    with serving(Node) as url, TemporaryDirectory() as d:
        config = Path(d) / "mlxmux.toml"
        config.write_text(f'[[nodes]]\nid = "locked"\nurl = "{url}"\napi_key = "node-secret-123"\n')
        with gateway(extra=["--config", str(config)]) as g:
            r = httpx.post(
                g.url + "/v1/messages",
                json={"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
                timeout=20,
            )
            assert r.status_code == 200 and r.json()["content"][0]["text"] == "hi"
            views = [httpx.get(g.url + p, timeout=5).text for p in ("/cluster", "/admin/nodes", "/metrics")]
            log = g.output()
    assert seen and all(h == "Bearer node-secret-123" for h in seen)
    for text in (r.text, *views, log):
        assert "node-secret-123" not in text
