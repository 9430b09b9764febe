"""The supervisor/worker pipes: framed messages, per-case output split by markers, bounded tails."""

from __future__ import annotations

import io

from gradverify.report import CaseResult, Status
from gradverify.workerio import (MarkerSplitter, OutputTail, marker, marker_prefix, receive_message,
                                 send_message)


def test_messages_round_trip_and_a_cut_stream_reads_as_the_end() -> None:
    stream = io.BytesIO()
    result = CaseResult(op="Op", file="f.py", shapes=((2,),), dtype="float64", device="cpu", seed=0,
                        status=Status.PASSED, output="printed")
    send_message(stream, ("result", 3, result))
    send_message(stream, ("stop",))
    whole = stream.getvalue()
    reader = io.BytesIO(whole)
    assert receive_message(reader) == ("result", 3, result)
    assert receive_message(reader) == ("stop",)
    assert receive_message(reader) is None
    assert receive_message(io.BytesIO(whole[:-3])) == ("result", 3, result)
    assert receive_message(io.BytesIO(whole[:20])) is None  # a worker that died mid-message


def test_markers_are_found_across_any_chunk_boundary() -> None:
    prefix = marker_prefix("abc123")
    stream = b"import noise" + marker(prefix, "S", 0) + b"case zero, no newline" + marker(prefix, "E", 0) + \
        b"between" + marker(prefix, "S", 12) + b"case twelve\n" + marker(prefix, "E", 12) + b"tail"
    for size in (1, 2, 5, 7, len(stream)):
        splitter = MarkerSplitter(prefix)
        items = []
        for start in range(0, len(stream), size):
            items += splitter.feed(stream[start:start + size])
        items += splitter.close()
        # Merge adjacent text pieces: the chunking decides how text is cut, never what it holds.
        merged: list[tuple[str, object]] = []
        for kind, value in items:
            if kind == "text" and merged and merged[-1][0] == "text":
                merged[-1] = ("text", merged[-1][1] + value)  # type: ignore[operator]
            else:
                merged.append((kind, value))
        assert merged == [("text", b"import noise"), ("mark", ("S", 0)), ("text", b"case zero, no newline"),
                          ("mark", ("E", 0)), ("text", b"between"), ("mark", ("S", 12)),
                          ("text", b"case twelve\n"), ("mark", ("E", 12)), ("text", b"tail")], size


def test_a_marker_with_another_nonce_is_just_text() -> None:
    splitter = MarkerSplitter(marker_prefix("real"))
    forged = marker(marker_prefix("guess"), "E", 0)
    assert splitter.feed(forged) + splitter.close() == [("text", forged)]


def test_the_output_tail_keeps_the_end_and_says_what_was_cut() -> None:
    tail = OutputTail(limit=10)
    tail.add(b"0123456789" * 5)
    tail.add("é-end".encode())
    text = tail.text()
    assert text.endswith("é-end") and text.startswith("[... 46 earlier bytes of output not kept]\n")
    short = OutputTail(limit=10)
    short.add(b"hi\n")
    assert short.text() == "hi\n"
