"""What the supervising process and a worker say to each other (stdlib only: the parent never imports torch).

Three pipes per worker, none of them the worker's stdout as the user's code sees it:

* commands, parent -> worker: the worker's original stdin, moved to a private descriptor (fd 0
  becomes /dev/null, so an `input()` in the user's code cannot eat a command);
* events, worker -> parent: the worker's original stdout, moved to a private descriptor;
* output, worker -> parent: the worker's stderr, onto which its fd 1 is also pointed. Everything
  the user's code prints (Python or C, stdout or stderr) goes there. Markers written by the worker
  itself delimit each case (`MarkerSplitter`), so the parent files the text under the right case,
  and what was printed before a crash survives the process (it is already in the pipe).

Commands and events are pickled objects, each framed by its length.
"""

from __future__ import annotations

import codecs
import pickle
import struct
from typing import Any, BinaryIO

_LENGTH = struct.Struct(">Q")

# What a case keeps of what the user's code printed: the end (where a crash or the last
# message is) and a count of what was cut.
OUTPUT_LIMIT = 4096

# Size of the shared block in which the worker writes the phase of user code it is in.
PHASE_BLOCK_SIZE = 128


def send_message(stream: BinaryIO, message: Any) -> None:
    """Write one framed, pickled message and flush it."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def receive_message(stream: BinaryIO) -> Any | None:
    """The next message, or None at the end of the stream (the other side closed it or died)."""
    header = _read_exactly(stream, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    data = _read_exactly(stream, length)
    if data is None:
        return None  # cut off mid-message: the writer died
    return pickle.loads(data)


def _read_exactly(stream: BinaryIO, count: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = count
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def marker_prefix(nonce: str) -> bytes:
    """The start of every marker of one run; the random nonce keeps user output from forging one."""
    return b"\x1egradverify-" + nonce.encode("ascii") + b":"


def marker(prefix: bytes, kind: str, index: int) -> bytes:
    """`kind` "S" (case `index` starts) or "E" (it ended). Shorter than PIPE_BUF: one atomic write."""
    return prefix + f"{kind}{index}\n".encode("ascii")


class MarkerSplitter:
    """Splits a worker's output stream into text and markers, across arbitrary chunk boundaries."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.pending = b""

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        """[("text", bytes) | ("mark", (kind, index))] in stream order."""
        buffer = self.pending + data
        self.pending = b""
        found: list[tuple[str, Any]] = []
        while True:
            start = buffer.find(self.prefix)
            if start < 0:
                break
            end = buffer.find(b"\n", start + len(self.prefix))
            if end < 0:
                if start:
                    found.append(("text", buffer[:start]))
                self.pending = buffer[start:]
                return found
            if start:
                found.append(("text", buffer[:start]))
            body = buffer[start + len(self.prefix):end]
            try:
                found.append(("mark", (body[:1].decode("ascii"), int(body[1:]))))
            except (UnicodeDecodeError, ValueError):
                found.append(("text", buffer[start:end + 1]))
            buffer = buffer[end + 1:]
        # Hold back a tail that may be the beginning of a marker cut by the chunk boundary.
        keep = next((n for n in range(min(len(self.prefix) - 1, len(buffer)), 0, -1)
                     if buffer.endswith(self.prefix[:n])), 0)
        text, self.pending = (buffer[:len(buffer) - keep], buffer[len(buffer) - keep:]) if keep else (buffer, b"")
        if text:
            found.append(("text", text))
        return found

    def close(self) -> list[tuple[str, Any]]:
        """What was held back, as text (the stream ended)."""
        rest, self.pending = self.pending, b""
        return [("text", rest)] if rest else []


class OutputTail:
    """The last OUTPUT_LIMIT bytes of a stream, and how much came before them."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * self.limit:
            del self.data[:-self.limit]

    def text(self) -> str:
        kept = bytes(self.data[-self.limit:])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(kept, final=True)
        cut = self.total - len(kept)
        if cut > 0:
            return f"[... {cut} earlier bytes of output not kept]\n" + text.lstrip("\ufffd")
        return text
