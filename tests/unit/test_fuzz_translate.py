"""Property tests: hostile input to the pure translation layer fails only in documented ways.

A client body either decodes into a `MessagesRequest` that every later step (translation, hashing,
token estimate, native forwarding) handles, or raises `InvalidRequest` (the app's 400). A node's answer
or stream chunk either decodes and translates, or raises a msgspec error (the relay's "invalid
completion" / "invalid stream chunk" node failure). Nothing else may escape: in the app it would be a 500.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.answers import from_chat_completion
from proxy.errors import InvalidRequest
from proxy.sse import SSEDecoder, encode_event
from proxy.stream import StreamTranslator
from proxy.translate import encode_chat_request, estimate_tokens, prompt_parts, to_chat_request, to_native_body
from proxy.wire.anthropic import MessageStopEvent, decode_count_tokens_request, decode_messages_request
from proxy.wire.openai import decode_chunk, decode_completion

# No `explain` phase: it imports libcst, whose DeprecationWarning would hide a failure under filterwarnings=error.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
NODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)
_json = msgspec.json.Encoder()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes any JSON value at all (a wrong type)."""
    return st.one_of(valid, valid, valid, json_values)


def obj(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object with any subset of `fields` (missing fields test "required")."""
    return st.fixed_dictionaries({}, optional=fields)


BLOCK_TYPES = ["text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking", "search_result"]
blocks = st.recursive(
    obj(
        type=maybe(st.sampled_from([*BLOCK_TYPES, "nope"])),
        text=maybe(st.text(max_size=20)),
        id=maybe(st.text(max_size=5)),
        name=maybe(st.text(max_size=5)),
        input=json_values,
        tool_use_id=maybe(st.text(max_size=5)),
        is_error=maybe(st.booleans()),
        thinking=maybe(st.text(max_size=5)),
        source=maybe(obj(type=maybe(st.sampled_from(["base64", "url", "text", "content"])), data=json_values)),
    ),
    lambda inner: obj(
        type=st.just("tool_result"), tool_use_id=st.text(max_size=3), content=st.lists(inner, max_size=3)
    ),
    max_leaves=6,
)
messages = obj(
    role=maybe(st.sampled_from(["user", "assistant", "system", "tool"])),
    content=maybe(st.text(max_size=20) | st.lists(blocks, max_size=4)),
)
tools = obj(name=maybe(st.text(max_size=8)), description=json_values, input_schema=json_values, type=json_values)
requests = obj(
    model=maybe(st.text(max_size=10)),
    max_tokens=maybe(st.integers(min_value=-5, max_value=2**64)),
    messages=maybe(st.lists(messages, max_size=5)),
    system=maybe(st.text(max_size=30) | st.lists(obj(type=st.just("text"), text=st.text(max_size=30)), max_size=3)),
    tools=maybe(st.lists(tools, max_size=3)),
    tool_choice=maybe(obj(type=maybe(st.sampled_from(["auto", "any", "none", "tool"])), name=json_values)),
    stop_sequences=maybe(st.lists(st.text(max_size=5), max_size=3)),
    temperature=json_values,
    top_k=json_values,
    stream=maybe(st.booleans()),
    metadata=maybe(obj(user_id=maybe(st.text(max_size=40)))),
    thinking=json_values,
    extra=json_values,
)


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


def raw_bodies() -> st.SearchStrategy[bytes]:
    deep = st.integers(min_value=500, max_value=20_000).map(
        lambda d: (
            b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],"tools":[{"name":"t",'
            b'"input_schema":' + nested(d) + b"}]}"
        )
    )
    return st.one_of(
        requests.map(_json.encode),
        st.binary(max_size=200),
        requests.map(_json.encode).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff" + b[i:])),
        deep,
    )


def _translate_everything(raw: bytes) -> None:
    """What the app does with a decoded body; none of it may fail once decoding succeeded."""
    try:
        req = decode_messages_request(raw)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message
        return
    for images in (False, True):
        chat = to_chat_request(req, model_id="m", max_tokens_cap=64, images=images, late_system="user")
        assert prompt_parts(chat)
        msgspec.json.decode(encode_chat_request(chat))
    assert estimate_tokens(req) > 0
    msgspec.json.decode(to_native_body(raw, model_id=None, max_tokens_cap=64))


@FUZZ
@given(raw_bodies())
def test_any_messages_body_is_translated_or_invalid_request(raw: bytes) -> None:
    _translate_everything(raw)


@FUZZ
@given(raw_bodies())
def test_any_count_tokens_body_is_estimated_or_invalid_request(raw: bytes) -> None:
    try:
        req = decode_count_tokens_request(raw)
    except InvalidRequest:
        return
    assert estimate_tokens(req) > 0


def test_deep_nesting_is_an_invalid_request_naming_the_problem() -> None:
    base = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],'
    for raw in (
        base + b'"unknown":' + nested(100_000) + b"}",
        base + b'"thinking":' + nested(100_000) + b"}",
        nested(100_000),
    ):
        try:
            decode_messages_request(raw)
        except InvalidRequest as exc:
            assert "nested too deeply" in exc.message or "Expected `object`" in exc.message
        else:
            raise AssertionError("a 100k-deep body decoded")


# -- node side -----------------------------------------------------------------------------------

tool_calls = obj(
    index=maybe(st.integers(min_value=-2, max_value=3)),
    id=maybe(st.text(max_size=4)),
    type=json_values,
    function=maybe(obj(name=maybe(st.text(max_size=4)), arguments=maybe(st.text(max_size=20)) | json_values)),
)
usage = obj(
    prompt_tokens=maybe(st.integers(min_value=-10, max_value=2**40)),
    completion_tokens=maybe(st.integers(min_value=-10, max_value=2**40)),
    prompt_tokens_details=maybe(obj(cached_tokens=maybe(st.integers(min_value=-10, max_value=2**40)))),
)
finish = maybe(st.sampled_from(["stop", "length", "tool_calls", "weird"]))
deltas = obj(
    content=maybe(st.text(max_size=10)),
    reasoning=maybe(st.text(max_size=10)),
    reasoning_content=maybe(st.text(max_size=10)),
    tool_calls=maybe(st.lists(tool_calls, max_size=3)),
)
chunks = obj(
    choices=maybe(st.lists(obj(delta=maybe(deltas), finish_reason=finish, stop_reason=json_values), max_size=2)),
    usage=maybe(usage),
)
completions = obj(
    choices=maybe(st.lists(obj(message=maybe(deltas), finish_reason=finish, stop_reason=json_values), max_size=2)),
    usage=maybe(usage),
)
node_bytes = st.one_of(completions.map(_json.encode), st.binary(max_size=100), st.just(nested(50_000, b"{}")))


@FUZZ
@given(node_bytes, st.lists(st.text(max_size=3), max_size=2))
def test_any_node_answer_is_translated_or_a_decode_error(raw: bytes, stops: list[str]) -> None:
    try:
        completion = decode_completion(raw)
    except NODE_ERRORS:
        return
    answer = from_chat_completion(completion, model="claude", message_id="msg_1", stop_sequences=stops)
    msgspec.json.decode(_json.encode(answer))


@FUZZ
@given(st.lists(st.one_of(chunks.map(_json.encode), st.binary(max_size=40), st.just(nested(5000))), max_size=8))
def test_any_node_stream_is_translated_or_a_decode_error(pieces: list[bytes]) -> None:
    tr = StreamTranslator(model="claude", message_id="msg_1", stop_sequences=["x"])
    events = tr.start()
    for piece in pieces:
        try:
            chunk = decode_chunk(piece)
        except NODE_ERRORS:
            continue
        events += tr.feed(chunk)
    events += tr.finish()
    assert isinstance(events[-1], MessageStopEvent)
    for event in events:
        encode_event(event)  # every event can be written to the client
    starts = [e.index for e in events if type(e).__name__ == "ContentBlockStartEvent"]
    assert starts == list(range(len(starts)))


@FUZZ
@given(st.lists(st.binary(max_size=60), max_size=10))
def test_sse_decoder_takes_any_bytes(pieces: list[bytes]) -> None:
    decoder = SSEDecoder()
    for piece in pieces:
        for msg in decoder.feed(piece):
            assert msg.data is not None or msg.comment is not None
    decoder.flush()
    assert decoder.pending == 0
