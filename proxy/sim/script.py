"""The simulated node's deterministic "model": what it replies, and token by token how (pure: no I/O).

Replies, from the current turn (the messages after the last assistant message):

- a tool result in the turn (`role: tool`): text quoting its first 200 characters;
- `/tool NAME {json args}`, NAME offered in `tools`: that tool call, whole;
- a line `run: <command>`, with a tool named `Bash` offered: a Bash call `{"command": ..., "description": ...}`;
  directives are looked for in the turn's latest user message that has one, outside `<system-reminder>`
  sections (Claude Code appends context, skills and late system messages after what the person typed);
- otherwise "Hello from sim node X. …", padded with plain words to the configured reply length.

`plan_tokens` turns a reply into generated tokens (4-byte cells, see `proxy.sim.model`) with what each
token shows the client, cut by `max_tokens` (finish `length`) or a stop sequence (finish `stop`, the
matched text removed).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence

import msgspec

from proxy.sim.cache import TOKEN_BYTES, token_count
from proxy.sim.model import Conversation, Message, SegmentKind, ToolCall, canonical_json, generated_cells

QUOTE_CHARS = 200
_FILLER = (
    "the node keeps your prompt in its cache so the next turn starts at once while a cold node "
    "reads every token again before it can say a single word back to you"
)
_WORDS = _FILLER.split(" ")
_TOOL_DIRECTIVE = re.compile(r"/tool\s+([A-Za-z0-9_.:\-]+)")
_RUN_DIRECTIVE = re.compile(r"(?m)^[ \t]*run:[ \t]*(\S[^\n]*)")
# Claude Code wraps what it adds to a user message (skills, context, hook output) in these; the
# directives are for what the person typed.
_REMINDER = re.compile(r"<system-reminder>.*?(?:</system-reminder>|\Z)", re.DOTALL)


class Reply(msgspec.Struct, frozen=True):
    """What the scripted model says: reasoning, visible text, tool calls."""

    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


class Piece(msgspec.Struct, frozen=True):
    """One generated token as the client sees it: a text delta (maybe empty) or a whole tool call."""

    kind: SegmentKind
    text: str = ""
    tool_call: ToolCall | None = None


class TokenPlan(msgspec.Struct, frozen=True):
    """Generated tokens: `cells` (what the cache stores) and one `Piece` per token."""

    cells: bytes
    pieces: tuple[Piece, ...]
    finish_reason: str
    stop_sequence: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def _current_turn(messages: Sequence[Message]) -> Sequence[Message]:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "assistant":
            return messages[i + 1 :]
    return messages


def _pad(text: str, target_bytes: int) -> str:
    words: list[str] = []
    size = len(text.encode("utf-8"))
    i = 0
    while size < target_bytes:
        word = _WORDS[i % len(_WORDS)]
        words.append(word)
        size += len(word) + 1
        i += 1
    return text + " ".join(words) + ("." if words else "")


def _directive_call(text: str, offered: Sequence[str]) -> tuple[ToolCall | None, str]:
    """A tool call asked for by a directive in `text`, or None and a note for the reply text."""
    text = _REMINDER.sub("", text)
    matches = list(_TOOL_DIRECTIVE.finditer(text))
    if matches:
        m = matches[-1]
        name = m.group(1)
        if name not in offered:
            return None, f"(no tool named {name} was offered) "
        rest = text[m.end() :].lstrip()
        args: object = {}
        if rest.startswith("{"):
            try:
                args, _ = json.JSONDecoder().raw_decode(rest)
            except ValueError:
                return None, f"(the arguments for {name} are not valid JSON) "
        return ToolCall(name, canonical_json(args)), ""
    runs = list(_RUN_DIRECTIVE.finditer(text))
    if runs and "Bash" in offered:
        command = runs[-1].group(1).strip()
        args = {"command": command, "description": f"Run {command[:60]} (asked by the user via the sim node)"}
        return ToolCall("Bash", canonical_json(args)), ""
    return None, ""


def write_reply(
    conv: Conversation,
    *,
    node_id: str,
    reply_tokens: int,
    reasoning: bool,
    prompt_tokens: int,
    cached_tokens: int,
) -> Reply:
    """The scripted reply to a conversation (see the module docstring)."""
    turn = _current_turn(conv.messages)
    thought = f"The user wants an answer from sim node {node_id}; I will keep it short." if reasoning else ""
    tool_results = [m for m in turn if m.role == "tool"]
    if tool_results:
        quote = tool_results[-1].content[:QUOTE_CHARS]
        usage = f"{prompt_tokens} prompt tokens, {cached_tokens} cached"
        text = f'Sim node {node_id} got the tool result ({usage}): "{quote}"'
        return Reply(thought, text)
    # The latest directive of the turn: Claude Code may append more user content (a late system
    # message, which arrives here as a user message) after what the person typed.
    call, note = None, ""
    for message in reversed([m for m in turn if m.role == "user"]):
        call, note = _directive_call(message.content, conv.tool_names)
        if call is not None or note:
            break
    if call is not None:
        return Reply(thought, f"Sim node {node_id} calls {call.name}.", (call,))
    usage = f"I read {prompt_tokens} prompt tokens, {cached_tokens} from my cache."
    intro = f"Hello from sim node {node_id}. {note}{usage} "
    return Reply(thought, _pad(intro, reply_tokens * TOKEN_BYTES))


def _segment_pieces(kind: SegmentKind, seg: bytes, text: str, call: ToolCall | None) -> list[Piece]:
    """One Piece per cell of a generated segment."""
    n = len(seg) // TOKEN_BYTES
    if kind in ("reasoning", "content"):
        raw = text.encode("utf-8")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        step = TOKEN_BYTES
        return [Piece(kind, decoder.decode(raw[i * step : (i + 1) * step], final=i == n - 1)) for i in range(n)]
    if kind == "tool":
        return [Piece("tool") for _ in range(n - 1)] + [Piece("tool", tool_call=call)]
    return [Piece("marker") for _ in range(n)]


def plan_tokens(reply: Reply, *, max_tokens: int, stop: Sequence[str] = ()) -> TokenPlan:
    """Generated tokens for a reply, cut by a stop sequence (finish `stop`) or `max_tokens` (finish `length`).

    A tool call shows as one Piece carrying the whole call, on its last token; tokens before it show
    nothing, so a call cut by `max_tokens` never appears.
    """
    hits = [(i, s) for s in stop if (i := reply.content.find(s)) >= 0]
    stop_at = min(hits) if hits else None
    cells: list[bytes] = []
    pieces: list[Piece] = []
    calls = iter(reply.tool_calls)
    finish = "tool_calls" if reply.tool_calls else "stop"
    for kind, seg in generated_cells(reply.reasoning, reply.content, reply.tool_calls):
        text = reply.reasoning if kind == "reasoning" else reply.content
        seg_pieces = _segment_pieces(kind, seg, text, next(calls) if kind == "tool" else None)
        if kind == "content" and stop_at is not None:
            # Generate up to the token that completes the stop sequence; show only the text before it.
            at, word = stop_at
            end = token_count(reply.content[: at + len(word)].encode("utf-8"))
            budget = at  # characters of content still to show
            for p in seg_pieces[:end]:
                shown = p.text[:budget]
                budget -= len(shown)
                pieces.append(Piece("content", shown))
            cells.append(seg[: end * TOKEN_BYTES])
            if len(pieces) <= max_tokens:
                return TokenPlan(b"".join(cells), tuple(pieces), "stop", word)
            break
        cells.append(seg)
        pieces += seg_pieces
    all_cells = b"".join(cells)
    if len(pieces) > max_tokens:
        return TokenPlan(all_cells[: max_tokens * TOKEN_BYTES], tuple(pieces[:max_tokens]), "length")
    return TokenPlan(all_cells, tuple(pieces), finish)
