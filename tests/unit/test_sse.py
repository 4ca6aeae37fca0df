"""SSE: the decoder reads node streams split anywhere; the encoder writes what Anthropic clients parse."""

from __future__ import annotations

import json
import tracemalloc

import msgspec
import pytest

from proxy.sse import PING, SSEDecoder, SSEMessage, encode_event
from proxy.wire.anthropic import (
    APIError,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    ErrorEvent,
    InputJSONDelta,
    MessageDelta,
    MessageDeltaEvent,
    MessagesResponse,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolUseBlock,
    Usage,
)

# What mlx_lm.server writes, with the line ends other servers use, UTF-8 in several widths.
MLX_STREAM = (
    b": keepalive 256/1024\n\n"
    b": keepalive 1024/1024\n\n"
    b'data: {"choices":[{"delta":{"content":"Gr\xc3\xbc\xc3\x9fe"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"\xe2\x9c\x93 \xf0\x9f\x8e\x89"}}]}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED_MLX = [
    SSEMessage(comment="keepalive 256/1024"),
    SSEMessage(comment="keepalive 1024/1024"),
    SSEMessage(data='{"choices":[{"delta":{"content":"Grüße"}}]}'),
    SSEMessage(data='{"choices":[{"delta":{"content":"✓ 🎉"}}]}'),
    SSEMessage(data="[DONE]"),
]

ANTHROPIC_STREAM = (
    b'event: message_start\r\ndata: {"type":"message_start"}\r\n\r\n'
    b'event: ping\rdata: {"type": "ping"}\r\r'
    b'event:content_block_delta\ndata:{"a":\n'
    b"data: 1}\n"
    b"id: 7\nretry: 100\n\n"
    b"data\n\n"
)
EXPECTED_ANTHROPIC = [
    SSEMessage(event="message_start", data='{"type":"message_start"}'),
    SSEMessage(event="ping", data='{"type": "ping"}'),
    SSEMessage(event="content_block_delta", data='{"a":\n1}'),
    SSEMessage(data=""),
]


def decode_in_pieces(stream: bytes, size: int) -> list[SSEMessage]:
    decoder = SSEDecoder()
    out: list[SSEMessage] = []
    for i in range(0, len(stream), size):
        out += decoder.feed(stream[i : i + size])
    return out + decoder.flush()


@pytest.mark.parametrize(("stream", "expected"), [(MLX_STREAM, EXPECTED_MLX), (ANTHROPIC_STREAM, EXPECTED_ANTHROPIC)])
def test_split_at_every_boundary(stream: bytes, expected: list[SSEMessage]) -> None:
    """Cut once at each byte: inside UTF-8 characters, between \\r and \\n, inside `data:`."""
    assert decode_in_pieces(stream, len(stream)) == expected
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.flush()
        assert out == expected, f"cut at byte {cut}"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_fed_in_small_chunks(size: int) -> None:
    assert decode_in_pieces(MLX_STREAM, size) == EXPECTED_MLX
    assert decode_in_pieces(ANTHROPIC_STREAM, size) == EXPECTED_ANTHROPIC


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_line_ends(end: bytes) -> None:
    stream = b"event: e" + end + b"data: a" + end + b"data:b" + end + end + b":c" + end
    assert decode_in_pieces(stream, 1) == [SSEMessage(event="e", data="a\nb"), SSEMessage(comment="c")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"data: x", "x"),
        (b"data:x", "x"),
        (b"data:  x", " x"),  # only one space goes
        (b"data: a: b", "a: b"),
        (b"data:", ""),
    ],
)
def test_data_value(line: bytes, expected: str) -> None:
    assert decode_in_pieces(line + b"\n\n", 100) == [SSEMessage(data=expected)]


def test_events_are_only_dispatched_by_a_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\n") == [SSEMessage(data="one")]
    assert decoder.feed(b"event: x\n\n") == []  # no data: nothing to dispatch
    assert decoder.feed(b"data: two\n\n") == [SSEMessage(data="two")]  # the event name did not leak


def test_flush_takes_a_last_event_without_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: [DONE]") == [SSEMessage(data="a")]
    assert decoder.flush() == [SSEMessage(data="[DONE]")]
    assert decoder.flush() == []


def test_byte_order_mark_is_ignored() -> None:
    assert decode_in_pieces(b"\xef\xbb\xbfdata: x\n\n", 1) == [SSEMessage(data="x")]


def test_invalid_utf8_does_not_stop_the_stream() -> None:
    assert decode_in_pieces(b"data: \xff\n\ndata: ok\n\n", 3) == [SSEMessage(data="\ufffd"), SSEMessage(data="ok")]


def test_many_events_in_one_feed() -> None:
    stream = b"".join(b'data: {"n":%d}\n\n' % i for i in range(100))
    assert [m.data for m in SSEDecoder().feed(stream)] == [f'{{"n":{i}}}' for i in range(100)]


def test_an_endless_line_costs_linear_work_and_memory() -> None:
    """32 MB in 64 KB chunks without a line end (a node streaming one endless line): each byte is searched
    once, held once and copied once more when the line ends. Appending each chunk to the whole line held
    so far (the old `str +=`) copied ~8.6 GB for it and held two copies at once."""
    decoder, piece, count = SSEDecoder(), b"x" * 65536, 512
    fed = len(piece) * count + len(b"data: ")
    tracemalloc.start()
    try:
        assert decoder.feed(b"data: ") == []
        for _ in range(count):
            assert decoder.feed(piece) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoder.pending == fed  # what a caller bounds (server.max_answer_bytes)
    assert decoder.scanned == fed  # nothing fed before was looked at again
    assert peak < 1.25 * fed, f"{peak / 2**20:.1f} MiB held for a {fed / 2**20:.1f} MiB line"
    [message] = decoder.feed(b"\n\n")
    assert message.data is not None and len(message.data) == fed - len(b"data: ")
    assert decoder.scanned <= 2 * fed + 2 and decoder.pending == 0


def test_a_line_dribbled_a_byte_at_a_time_costs_a_byte_a_byte() -> None:
    decoder, fed = SSEDecoder(), 100_000
    tracemalloc.start()
    try:
        for _ in range(fed):
            decoder.feed(b"y")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoder.pending == decoder.scanned == fed
    assert peak < 2 * fed, f"{peak} bytes held for a {fed} byte line"  # no object per piece


# -- encoding ----------------------------------------------------------------------------------

USAGE = Usage(input_tokens=1, output_tokens=2, cache_read_input_tokens=3)
EVENTS: list[StreamEvent] = [
    MessageStartEvent(MessagesResponse(id="msg_1", model="m", content=[], usage=Usage())),
    ContentBlockStartEvent(0, TextBlock("")),
    ContentBlockStartEvent(1, ToolUseBlock("toolu_1", "Read", msgspec.Raw(b"{}"))),
    ContentBlockDeltaEvent(0, TextDelta("héllo\n")),
    ContentBlockDeltaEvent(1, InputJSONDelta('{"a": 1}')),
    ContentBlockStopEvent(0),
    MessageDeltaEvent(MessageDelta("end_turn", None), USAGE),
    MessageStopEvent(),
    PingEvent(),
    ErrorEvent(APIError("overloaded_error", "busy")),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_encode_event_names_the_type_twice(event: StreamEvent) -> None:
    raw = encode_event(event)
    head, data, tail = raw.split(b"\n", 2)
    assert tail == b"\n"
    name = head.removeprefix(b"event: ").decode()
    assert data.startswith(b"data: ")
    assert json.loads(data.removeprefix(b"data: "))["type"] == name


def test_encoded_shapes() -> None:
    assert encode_event(ContentBlockDeltaEvent(0, TextDelta("hi"))) == (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    )
    assert encode_event(ErrorEvent(APIError("overloaded_error", "busy"))) == (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    )
    assert encode_event(ContentBlockStartEvent(1, ToolUseBlock("toolu_1", "Read", msgspec.Raw(b"{}")))) == (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
        b'"content_block":{"type":"tool_use","id":"toolu_1","name":"Read","input":{}}}\n\n'
    )
    assert PING == b'event: ping\ndata: {"type": "ping"}\n\n'


def test_encode_then_decode() -> None:
    wire = PING + b"".join(encode_event(e) for e in EVENTS)
    messages = decode_in_pieces(wire, 1)
    assert [m.event for m in messages] == ["ping"] + [type(e).__struct_config__.tag for e in EVENTS]
    assert json.loads(messages[4].data or "")["delta"]["text"] == "héllo\n"
