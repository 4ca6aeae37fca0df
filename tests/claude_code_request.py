"""A Claude-Code-shaped `/v1/messages` body, for unit tests, integration tests and benchmarks.

Shape as observed from Claude Code 2.1.x (see /work/shared/PROTOCOL.md): the billing-header system
block first, a ~6 KB system prompt as text blocks with `cache_control`, ~24 tools (~64 KB of JSON
schema), `metadata.user_id` as a JSON string carrying the session id, `thinking: adaptive`,
`context_management`, `output_config`, `stream: true`, and a conversation that grows by one round per
turn (prompt → thinking + tool_use → tool_result → answer), with the `cache_control` marker on the
newest user message as Claude Code places it. All text is generated filler; it is deterministic, so
turn N+1 repeats turn N's history byte for byte, as a real client does.

    body = claude_code_request("9d1c…", turns=3)             # a dict; json-encode it to send
    body = claude_code_request("9d1c…", turns=["fix the bug", "now add a test"])
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

TOOL_NAMES = (
    "Task",
    "Bash",
    "Glob",
    "Grep",
    "ExitPlanMode",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
    "BashOutput",
    "KillShell",
    "Skill",
    "SlashCommand",
    "AskUserQuestion",
    "EnterPlanMode",
    "ListMcpResources",
    "ReadMcpResource",
    "LSP",
    "ToolSearch",
    "mcp__ide__getDiagnostics",
    "mcp__ide__executeCode",
)

_TEXT = (
    "the tool reads a path and returns its content with line numbers so that later edits can refer to "
    "exact lines; prefer it over shell commands when the file is known, keep calls small, never guess "
    "arguments, report failures plainly, respect the working directory and the permission mode chosen "
    "by the user, and explain what changed after every step in one short sentence"
)
_WORDS = tuple(_TEXT.split(" "))


def _filler(seed: str, words: int) -> str:
    """Deterministic prose-like filler of about `words` words."""
    digest = hashlib.sha256(seed.encode()).digest()
    out = []
    for i in range(words):
        out.append(_WORDS[(digest[i % len(digest)] + i * 7) % len(_WORDS)])
    return " ".join(out).capitalize() + "."


def _tool(name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for i in range(6):
        properties[f"{name.lower()}_param_{i}"] = {
            "type": ["string", "integer", "boolean", "array"][i % 4],
            "description": _filler(f"{name}/{i}", 45),
            **({"items": {"type": "string"}} if i % 4 == 3 else {}),
        }
    return {
        "name": name,
        "description": _filler(name, 150),
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": [f"{name.lower()}_param_0"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


def billing_header(session_id: str, turn: int = 0) -> str:
    """The first system block; its `cch` differs per request, as older clients send it."""
    cch = hashlib.sha256(f"{session_id}/{turn}".encode()).hexdigest()[:5]
    return f"x-anthropic-billing-header: cc_version=2.1.37.abc; cc_entrypoint=cli; cch={cch};"


def _prompt_message(prompt: str, *, newest: bool) -> dict[str, Any]:
    """A user prompt with its reminder; the newest one carries the cache_control marker."""
    last: dict[str, Any] = {"type": "text", "text": prompt}
    if newest:
        last["cache_control"] = {"type": "ephemeral"}
    reminder = f"<system-reminder>{_filler('reminder', 40)}</system-reminder>"
    return {"role": "user", "content": [{"type": "text", "text": reminder}, last]}


def _round(k: int, prompt: str, lines: int) -> list[dict[str, Any]]:
    """One finished round of the conversation: prompt, tool use, tool result, answer."""
    tool_id = f"toolu_{hashlib.sha256(str(k).encode()).hexdigest()[:24]}"
    return [
        _prompt_message(prompt, newest=False),
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": _filler(f"think/{k}", 30), "signature": f"sig{k}" * 20},
                {"type": "text", "text": "Let me look at the file first."},
                {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"read_param_0": f"/src/mod{k}.py"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": tool_id,
                    "content": "\n".join(f"{n:>6}\t{_filler(f'line/{k}/{n}', 8)}" for n in range(1, lines + 1)),
                }
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": _filler(f"answer/{k}", 80)}]},
    ]


def claude_code_request(
    session_id: str,
    turns: list[str] | int = 1,
    *,
    model: str = "claude-opus-4-8",
    stream: bool = True,
    max_tokens: int = 32000,
    mid_system: bool = True,
    server_tool: bool = False,
    file_lines: int = 59,
) -> dict[str, Any]:
    """The body Claude Code sends on turn `len(turns)` (or `turns`) of session `session_id`.

    `mid_system` puts a `role: system` reminder after the first round (when there is one);
    `server_tool` adds Anthropic's server-side web search tool (no input_schema) to the tools;
    `file_lines` is the length of the file each round reads (a real session reads much more).
    """
    prompts = (
        [f"Turn {i + 1}: {_filler(f'{session_id}/prompt/{i}', 25)}" for i in range(turns)]
        if isinstance(turns, int)
        else list(turns)
    )
    if not prompts:
        raise ValueError("a request needs at least one turn")
    messages: list[dict[str, Any]] = []
    for k, prompt in enumerate(prompts[:-1]):
        messages.extend(_round(k, prompt, file_lines))
        if k == 0 and mid_system:
            messages.append({"role": "system", "content": "<system-reminder>Files changed on disk.</system-reminder>"})
    messages.append(_prompt_message(prompts[-1], newest=True))
    tools = [_tool(name) for name in TOOL_NAMES]
    if server_tool:
        tools.append({"type": "web_search_20250305", "name": "web_search", "max_uses": 5})
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    device = hashlib.sha256(b"device").hexdigest()
    return {
        "model": model,
        "messages": messages,
        "system": [
            {"type": "text", "text": billing_header(session_id, len(prompts))},
            {
                "type": "text",
                "text": "You are Claude Code, a command line coding assistant.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": _filler("system", 1000), "cache_control": {"type": "ephemeral"}},
        ],
        "tools": tools,
        "metadata": {
            "user_id": json.dumps(
                {"device_id": device, "account_uuid": "", "session_id": session_id}, separators=(",", ":")
            )
        },
        "max_tokens": max_tokens,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "temperature": 1,
        "stream": stream,
    }


def sdk_kwargs(body: dict[str, Any], session: str) -> dict[str, Any]:
    """Arguments for the anthropic SDK's `messages.create` / `messages.stream` that send `body` as
    Claude Code does, with its session header."""
    keys = ("model", "messages", "system", "tools", "metadata", "max_tokens")
    return {**{k: body[k] for k in keys if k in body}, "extra_headers": {"x-claude-code-session-id": session}}
