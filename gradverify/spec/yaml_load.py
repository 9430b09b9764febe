"""Reading a YAML spec safely: plain data with line/column marks, and bounded work.

A spec is untrusted input (a pre-commit hook runs on whatever a commit holds), so reading it
must end quickly with one line for any file: it is read with a SafeLoader subclass (no object
construction), and its size, nesting depth and the size of its data once aliases are expanded
("billion laughs": nine anchors of ten aliases each make 10^9 nodes) are bounded before any
value is built. Every problem is a SpecError at `file:line:col`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gradverify.errors import SpecError
from gradverify.schema import describe

# A spec is a few hundred lines; 1 MiB is far past any real one and reads in milliseconds.
MAX_BYTES = 2**20
# Real specs nest about six levels (ops > op > inputs > input > shape); the composer and the
# constructor recurse once per level, so an unbounded depth ends in a RecursionError.
MAX_DEPTH = 50
# Nodes of the data once every alias is expanded: a real spec has hundreds.
MAX_NODES = 100_000
# Digits of one integer: past this, int() is slow (and Python refuses past 4300 digits).
MAX_INT_CHARS = 40


class MarkedDict(dict[Any, Any]):
    """A YAML mapping that remembers where it, each key and each value started."""

    mark: yaml.Mark
    key_marks: dict[Any, yaml.Mark]
    value_marks: dict[Any, yaml.Mark]


class MarkedList(list[Any]):
    """A YAML sequence that remembers where it and each item started."""

    mark: yaml.Mark
    item_marks: list[yaml.Mark]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, mark: yaml.Mark, first: yaml.Mark) -> None:
        super().__init__(key)
        self.key, self.mark, self.first = key, mark, first


class SpecLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, keeps marks on every container and bounds depth."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"data nested deeper than {MAX_DEPTH} levels",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: SpecLoader, node: MappingNode) -> MarkedDict:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            raise ConstructorError(None, None, "found an unhashable key", key_node.start_mark) from None
        if first is not None:
            raise _DuplicateKey(key, key_node.start_mark, first)
        seen[key] = key_node.start_mark
    loader.flatten_mapping(node)  # `<<: *anchor` merges; the mapping's own keys win
    data = MarkedDict()
    data.mark, data.key_marks, data.value_marks = node.start_mark, {}, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_marks[key] = key_node.start_mark
        data.value_marks[key] = value_node.start_mark
    return data


def _construct_sequence(loader: SpecLoader, node: SequenceNode) -> MarkedList:
    data = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    data.mark = node.start_mark
    data.item_marks = [child.start_mark for child in node.value]
    return data


def _scalar(build: Callable[[SpecLoader, ScalarNode], Any], what: str) -> Callable[[SpecLoader, ScalarNode], Any]:
    """A scalar constructor whose failures (a 5000-digit integer, `!!float x`) are marked
    YAML errors, not a ValueError from deep inside PyYAML."""

    def construct(loader: SpecLoader, node: ScalarNode) -> Any:
        if what == "an integer" and len(str(node.value)) > MAX_INT_CHARS:
            raise ConstructorError(None, None, f"an integer of more than {MAX_INT_CHARS} characters",
                                   node.start_mark)
        try:
            return build(loader, node)
        except (ValueError, OverflowError, TypeError):
            raise ConstructorError(None, None, f"{describe(str(node.value))}, which is not {what}",
                                   node.start_mark) from None

    return construct


def _timestamp_as_text(loader: SpecLoader, node: ScalarNode) -> str:
    """A spec holds no dates: `2001-13-45` stays the text it is (and a setting then says what
    it expected) instead of failing inside datetime."""
    return str(loader.construct_scalar(node))


SpecLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
SpecLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)
SpecLoader.add_constructor("tag:yaml.org,2002:int", _scalar(yaml.SafeLoader.construct_yaml_int, "an integer"))
SpecLoader.add_constructor("tag:yaml.org,2002:float", _scalar(yaml.SafeLoader.construct_yaml_float, "a number"))
SpecLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def where(mark: yaml.Mark) -> tuple[int, int]:
    """(line, column), both from 1, of a YAML mark."""
    return mark.line + 1, mark.column + 1


def expanded_size(root: Node, display: str) -> int:
    """Nodes in the data once aliases (and merges) are expanded, counted on the composed
    graph in linear time; SpecError past MAX_NODES or for a recursive alias."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            line, col = where(node.start_mark)
            raise SpecError("yaml: expected plain data, found an alias that contains itself",
                            file=display, line=line, col=col)
        visiting.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        if total > MAX_NODES:
            line, col = where(node.start_mark)
            raise SpecError(f"yaml: expected at most {MAX_NODES} values once aliases are expanded, found more "
                            "(anchors that multiply each other)", file=display, line=line, col=col)
        sizes[key] = total
        return total

    return size(root)


def read_text(path: Path) -> str:
    """The spec's text: UTF-8, at most MAX_BYTES; SpecError otherwise."""
    display = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror or exc}", file=display) from None
    if len(raw) > MAX_BYTES:
        raise SpecError(f"expected a spec of at most {MAX_BYTES // 2**20} MiB, found a larger file", file=display)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"expected a UTF-8 text file, found a byte that is not UTF-8 at offset {exc.start}",
                        file=display) from None


def read_yaml(path: Path) -> Any:
    """Parse `path` safely: plain data with marks, or SpecError pointing at the problem."""
    display = str(path)
    text = read_text(path)
    loader: SpecLoader | None = None
    try:
        loader = SpecLoader(text)  # checks that every character is printable
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node, display)
        return loader.construct_document(node)
    except _DuplicateKey as exc:
        line, col = where(exc.mark)
        raise SpecError(f"{exc.key}: expected each key once in a mapping, found {exc.key!r} again "
                        f"(first at line {exc.first.line + 1})", file=display, line=line, col=col) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at: tuple[int | None, int | None] = where(mark) if mark is not None else (None, None)
        found = exc.problem or "invalid YAML"
        if exc.context:
            found += f" ({exc.context})"
        raise SpecError(f"yaml: expected valid YAML (plain data only), found {found}",
                        file=display, line=at[0], col=at[1]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - text.rfind("\n", 0, exc.position)
        character = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        raise SpecError(f"yaml: expected printable text, found the control character {character!r}",
                        file=display, line=line, col=col) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"yaml: expected valid YAML, found {' '.join(str(exc).split())}", file=display) from None
    finally:
        if loader is not None:
            loader.dispose()
