from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmforge.agent.protocol import RS, Decoder, FramingError, encode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=12)
messages = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@given(st.lists(messages, min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=20))
@settings(max_examples=300)
def test_any_split_of_the_stream_gives_the_same_messages(msgs: list[dict[str, object]],
                                                         cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in msgs)
    dec = Decoder()
    got = []
    for piece in split_at(stream, cuts):
        got.extend(dec.feed(piece))
    assert got == msgs
    dec.finish()
    assert dec.skipped == 0


@given(st.binary(max_size=200).filter(lambda b: RS not in b), messages)
def test_garbage_before_a_message_is_skipped(garbage: bytes, msg: dict[str, object]) -> None:
    dec = Decoder()
    assert dec.feed(garbage + encode(msg)) == [msg]
    assert dec.skipped == len(garbage)


@given(messages, messages, st.integers(1, 10**6))
def test_half_message_then_resync(stale: dict[str, object], fresh: dict[str, object],
                                  cut: int) -> None:
    """A host reconnect mid-message: the stale head must not swallow the next message."""
    head = encode(stale)
    head = head[: 1 + cut % (len(head) - 1)]  # keeps RS, loses the LF
    dec = Decoder()
    assert dec.feed(head + encode(fresh)) == [fresh]


@given(messages, st.integers(1, 10**6))
def test_truncated_message_is_a_clear_error(msg: dict[str, object], cut: int) -> None:
    data = encode(msg)
    data = data[: 1 + cut % (len(data) - 1)]
    dec = Decoder()
    assert dec.feed(data) == []
    with pytest.raises(FramingError, match="truncated message"):
        dec.finish()


def test_rs_never_appears_inside_encoded_json() -> None:
    data = encode({"s": "\x1e\n" * 3})
    assert data.count(RS) == 1 and data.endswith(b"\n") and data.count(b"\n") == 1


def test_non_object_records_are_skipped() -> None:
    dec = Decoder()
    assert dec.feed(RS + b"[1,2]\n" + RS + b"{bad\n" + encode({"a": 1})) == [{"a": 1}]
    assert dec.skipped > 0


def test_oversized_record_is_dropped() -> None:
    dec = Decoder(max_record=100)
    assert dec.feed(RS + b"x" * 500) == []
    assert dec.feed(encode({"ok": True})) == [{"ok": True}]


def test_encoding_is_compact_json() -> None:
    assert json.loads(encode({"a": [1, 2]})[1:]) == {"a": [1, 2]}
