"""The one YAML loader for documents that come from users: specs, recipes, cloud-init seeds.

PyYAML's safe loader cannot run code, but it still accepts hostile or mistaken input that
this loader refuses, with the line and column of the culprit:

* **Alias bombs** ("billion laughs"): ``a: &a [x, x]``, ``b: &b [*a, *a]``, ... compose to a
  few nodes that *expand* to billions once anything walks them (pydantic, a JSON schema
  validator, ``json.dumps``, an error message quoting the input). Before anything is
  constructed, the node graph is walked once with memoised sizes (about a tenth of the
  load time); a document whose aliases expand to more than ``MAX_ALIAS_NODES`` nodes, that
  nests deeper than ``MAX_DEPTH``, or whose aliases refer to themselves, is refused.
* **Duplicate keys** (``name`` twice; JSON is parsed as YAML, so ``{"name": 1, "name": 2}``
  too): YAML forbids them but PyYAML keeps the last one silently. Keys that a merge key
  (``<<: *defaults``) brings in may still be overridden, as YAML intends. Seed content is
  loaded with ``allow_duplicates=True``: cloud-init keeps the last, and its own
  documentation repeats keys (``apt:`` twice in one example, ``bridge_maxwait`` in another).
* **Bad scalars** (``2024-13-45``, ``!!float x``): PyYAML's constructors raise ValueError,
  KeyError, IndexError or AttributeError for them; here they are YAML errors.

Errors are ``yaml.MarkedYAMLError`` subclasses, so every caller's existing handler turns them
into its own field-named error with the position. Also: :func:`compose` and
:func:`find_mark` map a JSON path (``["write_files", 0, "path"]``) back to its line/column.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

TYPE_CHECKING = False  # not typing's: `vmforge seed build` and `exec` must not import it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MAX_ALIAS_NODES", "MAX_DEPTH", "MAX_DOCUMENT_BYTES", "DocumentLimitError",
           "DuplicateKeyError", "BoundedLoader", "load", "compose", "find_mark",
           "describe_mark", "check_graph"]

#: At most this many nodes may be reached through aliases (counted expanded) in one document.
MAX_ALIAS_NODES = 10_000
#: Deepest nesting of collections accepted (libyaml itself stops at 1000, pure Python sooner).
MAX_DEPTH = 100
#: Largest spec or recipe read (seed files have their own, smaller, limit).
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024

_MERGE_TAG = "tag:yaml.org,2002:merge"
# libyaml's C parser when present: several times faster, same errors with the same marks.
_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DocumentLimitError(yaml.MarkedYAMLError):
    """The document is refused for its shape (alias expansion, depth), not its syntax."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice."""


class BoundedLoader(_Base):  # type: ignore[misc]
    """A safe loader that refuses alias bombs, excessive nesting and duplicate keys."""

    def __init__(self, stream: str | bytes, *, allow_duplicates: bool = False) -> None:
        super().__init__(stream)
        self._flattened: set[int] = set()
        self._allow_duplicates = allow_duplicates

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        check_graph(node)
        return self.construct_document(node)

    def flatten_mapping(self, node: MappingNode) -> None:
        # Every mapping passes through here before merge keys rewrite its value list, so
        # this is where its own (explicit) keys can still be told from merged ones.
        if id(node) not in self._flattened:
            self._flattened.add(id(node))
            if not self._allow_duplicates:
                self._check_duplicates(node)
        super().flatten_mapping(node)

    def _check_duplicates(self, node: MappingNode) -> None:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base constructor reports unhashable keys itself
            try:
                first = seen.get(key)
            except TypeError:  # a tuple holding a list, say: also unhashable
                continue
            if first is not None:
                raise DuplicateKeyError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {_short(key)} (first given at "
                    f"{describe_mark(first.start_mark)})", key_node.start_mark)
            seen[key] = key_node


def _checked(construct: Any) -> Any:
    """PyYAML's scalar constructors raise ValueError, KeyError, IndexError or AttributeError
    on values such as ``2024-13-45``, ``!!float`` or ``!!timestamp ''``: YAML errors here."""
    def wrapper(loader: Any, node: Node) -> Any:
        try:
            return construct(loader, node)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # any failure here means a bad scalar value
            tag = node.tag.rsplit(":", 1)[-1]
            why = f": {_short(str(exc))[1:-1]}" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{_short(node.value)} is not a valid {tag}{why}",
                node.start_mark) from None
    return wrapper


for _tag in ("null", "bool", "int", "float", "binary", "timestamp"):
    _tag = f"tag:yaml.org,2002:{_tag}"
    BoundedLoader.add_constructor(_tag, _checked(yaml.SafeLoader.yaml_constructors[_tag]))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_mark(mark: yaml.Mark | None) -> str:
    """``line 3, column 5`` (1-based) for a node or problem mark."""
    if mark is None:
        return "unknown position"
    return f"line {mark.line + 1}, column {mark.column + 1}"


def check_graph(root: Node) -> None:
    """Refuse alias expansion past MAX_ALIAS_NODES, nesting past MAX_DEPTH, and cycles.

    One iterative walk; the expanded size of each node is memoised, so the cost is linear in
    the composed (not the expanded) document however the aliases are arranged.
    """
    size: dict[int, int] = {}  # id(node) -> expanded node count, once finished
    on_path: set[int] = set()
    alias_nodes = 0
    # (node, depth, children iterator or None when not yet entered)
    stack: list[tuple[Node, int, Any]] = [(root, 1, None)]
    while stack:
        node, depth, children = stack.pop()
        if children is None:
            key = id(node)
            if key in size:  # reached again: an alias
                alias_nodes += size[key]
                if alias_nodes > MAX_ALIAS_NODES:
                    raise DocumentLimitError(
                        "while composing a document", None,
                        f"aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias "
                        "bomb?); write the content out or use fewer aliases",
                        node.start_mark)
                continue
            if key in on_path:
                raise DocumentLimitError("while composing a document", None,
                                         "an alias refers to a node that contains it",
                                         node.start_mark)
            if isinstance(node, ScalarNode):
                size[key] = 1
                continue
            if depth > MAX_DEPTH:
                raise DocumentLimitError("while composing a document", None,
                                         f"collections nested deeper than {MAX_DEPTH} levels",
                                         node.start_mark)
            on_path.add(key)
            kids: list[Node] = []
            if isinstance(node, MappingNode):
                for k, v in node.value:
                    kids.append(k)
                    kids.append(v)
            elif isinstance(node, SequenceNode):
                kids = list(node.value)
            stack.append((node, depth, kids))
            for kid in reversed(kids):
                stack.append((kid, depth + 1, None))
        else:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size.get(id(k), 0) for k in children)


def load(text: str | bytes, *, allow_duplicates: bool = False) -> Any:
    """Parse one YAML (or JSON) document with the limits above; raises ``yaml.YAMLError``.

    ``allow_duplicates``: a repeated key is no error, the last one wins (cloud-init's
    reading). RecursionError (pure-Python parser on deep input) becomes a
    DocumentLimitError too.
    """
    loader = BoundedLoader(text, allow_duplicates=allow_duplicates)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise DocumentLimitError(None, None, f"collections nested deeper than {MAX_DEPTH} "
                                 "levels", None) from None
    finally:
        loader.dispose()


def compose(text: str | bytes) -> Node | None:
    """The node graph of a document (with marks), for mapping a JSON path to a position."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        return node if isinstance(node, Node) else None
    finally:
        loader.dispose()


def find_mark(root: Node | None, path: Sequence[str | int], *,
              key: bool = True) -> yaml.Mark | None:
    """Where ``path`` is in the document: the key's mark for a mapping entry (``key=True``),
    else the value's. Stops at the deepest node found when the path leaves the document."""
    if root is None:
        return None
    node: Node = root
    mark = node.start_mark
    constructor = BoundedLoader("")
    for part in path:
        if isinstance(node, MappingNode):
            for k, v in node.value:
                try:
                    value = constructor.construct_object(k, deep=True)
                except yaml.YAMLError:
                    continue
                if value == part or (not isinstance(value, dict | list)
                                     and str(value) == str(part)):
                    mark = k.start_mark if key else v.start_mark
                    node = v
                    break
            else:
                return mark
        elif isinstance(node, SequenceNode) and isinstance(part, int) \
                and 0 <= part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            return mark
    return mark
