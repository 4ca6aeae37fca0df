"""What each kind of node is sent for the same Claude Code request (proxy.messages.upstream_request)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from proxy.attempts import Prepared
from proxy.config import NodeConfig, load_settings
from proxy.messages import upstream_request
from proxy.translate import to_chat_request
from proxy.wire.anthropic import decode_messages_request

PNG = "iVBORw0KGgo="
BODY = {
    "model": "claude-opus-4-8",
    "max_tokens": 64000,
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cch=1;"}, {"type": "text", "text": "Be brief."}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "text", "text": "what is this?"},
            ],
        },
        {"role": "system", "content": "<system-reminder>files changed</system-reminder>"},
    ],
}


def sent(node: NodeConfig, session: str | None = "s1") -> tuple[str, dict[str, Any], dict[str, str]]:
    settings = load_settings(env={}, nodes=[])
    raw = json.dumps(BODY).encode()
    body = decode_messages_request(raw)
    chat = to_chat_request(body, model_id=None, max_tokens_cap=settings.server.max_tokens_cap)
    prep = Prepared(raw, body, chat, "default", (), session, "msg_1", "req_1", 0.0)
    gw: Any = SimpleNamespace(settings=settings, cluster=SimpleNamespace(nodes={node.id: node}))
    path, data = upstream_request(gw, prep, node.id)
    return path, msgspec.json.decode(data), prep.upstream_headers


def test_plain_mlx_node() -> None:
    path, body, headers = sent(NodeConfig(url="http://mac1:8080", id="mac1"))
    assert path == "/v1/chat/completions"
    assert "model" not in body  # mlx_lm.server uses the model it loaded
    assert body["max_tokens"] == 32768  # clamped, always sent
    assert [m["role"] for m in body["messages"]] == ["system", "user", "user"]
    assert body["messages"][0]["content"] == "Be brief."  # billing header dropped
    assert "[image" in json.dumps(body["messages"][1])  # text-only node: a placeholder
    assert body["messages"][2]["content"].startswith("<system-reminder>")
    assert headers == {"x-session-id": "s1"}


def test_node_with_images_and_late_system_messages() -> None:
    node = NodeConfig(url="http://mac2:8080", id="mac2", model="qwen-vl", images=True, late_system="system")
    _, body, _ = sent(node)
    assert body["model"] == "qwen-vl"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "system"]
    assert body["messages"][1]["content"][0]["image_url"]["url"] == f"data:image/png;base64,{PNG}"


@pytest.mark.parametrize("session", [None, ""])
def test_no_session_no_header(session: str | None) -> None:
    assert sent(NodeConfig(url="http://mac1:8080", id="mac1"), session)[2] == {}


def test_native_node_gets_the_messages_body() -> None:
    path, body, _ = sent(NodeConfig(url="http://box:8000", id="box", model="qwen3", protocol="anthropic"))
    assert path == "/v1/messages"
    assert body["model"] == "qwen3"
    assert body["max_tokens"] == 32768
    assert [b["text"] for b in body["system"]] == ["Be brief."]
