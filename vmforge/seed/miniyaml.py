"""A reader for the plain YAML that cloud-configs are made of, exact or refusing.

PyYAML costs a command about 15 ms of start-up (its modules, a large regular expression
compiled at import, the libyaml extension), more than `cloud-localds` takes in all. Most
user-data is simple block YAML: mappings, lists, plain and quoted strings, ``|`` blocks, numbers
and booleans. :func:`load` reads exactly that and returns what ``vmforge.yamlload.load`` (PyYAML's
safe loader, YAML 1.1) returns for it; for anything else (anchors, tags, ``>`` folding, flow
mappings, multi-line plain or quoted scalars, floats, dates, octal and sexagesimal numbers,
tabs, a ``#`` next to a quote, a repeated key...) it raises :class:`Unsupported` and the caller
uses PyYAML, which also gives the error messages with their positions. A differential test
(tests/unit/test_miniyaml.py) compares both on cloud-init's examples and variants of them.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # not typing's: the seed path must not import it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["load", "Unsupported"]

MAX_DEPTH = 100  # as vmforge.yamlload


class Unsupported(Exception):
    """Not in the subset: read it with PyYAML."""


# ASCII only (other text goes to PyYAML), and of it only what YAML allows outside of tabs
# and CR: a small class compiles in microseconds where YAML's full one takes milliseconds.
_REFUSED = re.compile("[^\n\x20-\x7e]")
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z")
_BOOLS = {"yes": True, "Yes": True, "YES": True, "true": True, "True": True, "TRUE": True,
          "on": True, "On": True, "ON": True, "no": False, "No": False, "NO": False,
          "false": False, "False": False, "FALSE": False, "off": False, "Off": False,
          "OFF": False}
_NULLS = ("null", "Null", "NULL", "~")
_SPECIAL_FLOATS = ("inf", "Inf", "INF", "nan", "NaN", "NAN")
# Every character a YAML 1.1 int, float or timestamp can have (PyYAML's resolver patterns).
_NUMERIC_CHARS = frozenset("0123456789abcdefABCDEFxXoOtTZ+-._: nNiI")
_DOTTED = re.compile(r"[0-9]+(?:\.[0-9]+)+\Z")
_INDICATORS = frozenset(",[]{}#&*!|>'\"%@`?:")
_ESCAPES = {"0": "\0", "a": "\x07", "b": "\x08", "t": "\t", "n": "\n", "v": "\x0b",
            "f": "\x0c", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "\\": "\\", "/": "/",
            "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}
_HEX = {"x": 2, "u": 4, "U": 8}


def load(text: str) -> Any:
    """The document's value, or :class:`Unsupported`."""
    if not text.strip(" \n"):
        return None
    if not text.isascii() or _REFUSED.search(text) or not text.endswith("\n"):
        raise Unsupported("characters or ending outside the subset")
    return _Reader(text.split("\n")[:-1]).document()


def _plain(s: str) -> Any:
    """A plain scalar as YAML 1.1 (PyYAML's resolver) types it, where the subset is sure."""
    if not s:
        return None
    c = s[0]
    if c in _INDICATORS or c == "-" and (len(s) == 1 or s[1] == " "):
        raise Unsupported("indicator")
    if ": " in s or s.endswith(":") or " #" in s:
        raise Unsupported("mapping or comment in a plain scalar")
    if c in "+-.0123456789":
        if _INT.match(s):
            return int(s)
        if c in "-." and s[1].isalpha() and s[1:] not in _SPECIAL_FLOATS:
            return s
        if not _NUMERIC_CHARS.issuperset(s) or s.count(".") > 1 and _DOTTED.match(s):
            return s  # no YAML 1.1 number or date has these characters, or dots so (1.2.3)
        raise Unsupported("a number YAML 1.1 reads its own way")
    if c == "~" or c == "<" or c == "=":
        if s in ("~", "<<", "="):
            if s == "~":
                return None
            raise Unsupported("merge or value key")
        return s
    if s in _BOOLS:
        return _BOOLS[s]
    if s in _NULLS:
        return None
    return s


def _single(s: str, i: int) -> tuple[str, int]:
    """A single-quoted scalar starting at s[i]; (value, index after the closing quote)."""
    out = []
    j = i + 1
    while True:
        k = s.find("'", j)
        if k < 0:
            raise Unsupported("multi-line quoted scalar")
        out.append(s[j:k])
        if s.startswith("''", k):
            out.append("'")
            j = k + 2
            continue
        return "".join(out), k + 1


def _double(s: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    j = i + 1
    n = len(s)
    while j < n:
        ch = s[j]
        if ch == '"':
            return "".join(out), j + 1
        if ch == "\\":
            if j + 1 >= n:
                raise Unsupported("escaped line break")
            e = s[j + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                j += 2
            elif e in _HEX:
                digits = s[j + 2:j + 2 + _HEX[e]]
                if len(digits) != _HEX[e] or not all(d in "0123456789abcdefABCDEF"
                                                     for d in digits):
                    raise Unsupported("bad escape")
                code = int(digits, 16)
                if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                    raise Unsupported("surrogate escape")
                out.append(chr(code))
                j += 2 + _HEX[e]
            else:
                raise Unsupported("unknown escape")
        else:
            out.append(ch)
            j += 1
    raise Unsupported("multi-line quoted scalar")


def _quoted(s: str) -> tuple[str, str]:
    """A quoted scalar at the start of ``s``: (value, what follows it)."""
    value, end = (_single if s[0] == "'" else _double)(s, 0)
    return value, s[end:]


def _flow_sequence(s: str) -> list[Any]:
    """``[a, "b", 3]`` on one line, scalars only."""
    inner = s[1:]
    items: list[Any] = []
    while True:
        inner = inner.lstrip(" ")
        if not inner:
            raise Unsupported("multi-line flow sequence")
        if inner[0] == "]" and not items:
            rest = inner[1:]
            break
        if inner[0] in "'\"":
            value, inner = _quoted(inner)
            items.append(value)
            inner = inner.lstrip(" ")
        else:
            end = min((k for k in (inner.find(","), inner.find("]")) if k >= 0), default=-1)
            if end < 0:
                raise Unsupported("multi-line flow sequence")
            token = inner[:end].rstrip(" ")
            if not token or any(ch in token for ch in "[]{}:#\"'"):
                raise Unsupported("flow item outside the subset")
            items.append(_plain(token))
            inner = inner[end:]
        if inner.startswith(","):
            inner = inner[1:]
            if inner.lstrip(" ").startswith("]"):
                raise Unsupported("trailing comma")
            continue
        if inner.startswith("]"):
            rest = inner[1:]
            break
        raise Unsupported("flow sequence")
    if rest.strip(" "):
        raise Unsupported("text after a flow sequence")
    return items


def _split_key(text: str) -> tuple[Any, str] | None:
    """``key: rest`` -> (key, rest); None when ``text`` is not a mapping entry."""
    if text[0] in "'\"":
        key, after = _quoted(text)
        if after == ":" or after.startswith(": "):
            return key, after[1:].lstrip(" ")
        if ":" in after:
            raise Unsupported("quoted key")
        return None
    k = text.find(": ")
    if k < 0:
        if not text.endswith(":"):
            return None
        k = len(text) - 1
    key = _plain(text[:k].rstrip(" "))
    if isinstance(key, str) and key != text[:k]:
        raise Unsupported("space before the colon")
    return key, text[k + 1:].lstrip(" ")


class _Reader:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.i = 0
        self.depth = 0

    # -- lines
    def peek(self) -> tuple[int, str] | None:
        """The next line that is not blank or a comment: (indent, text without comment)."""
        lines = self.lines
        while self.i < len(lines):
            line = lines[self.i]
            body = line.lstrip(" ")
            if not body or body[0] == "#":
                self.i += 1
                continue
            if line.startswith(("---", "...", "%")):
                raise Unsupported("document markers and directives")
            if "#" in body:
                if "'" in body or '"' in body:
                    raise Unsupported("a comment next to a quote")
                k = body.find(" #")
                if k >= 0:
                    body = body[:k]
            return len(line) - len(line.lstrip(" ")), body.rstrip(" ")
        return None

    # -- nodes
    def document(self) -> Any:
        head = self.peek()
        if head is None:
            return None
        value = self.node(head[0])
        if self.peek() is not None:
            raise Unsupported("text after the document")
        return value

    def node(self, indent: int) -> Any:
        head = self.peek()
        assert head is not None
        n, text = head
        if n < indent:
            raise Unsupported("indentation")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Unsupported("deep")
        try:
            if text == "-" or text.startswith("- "):
                return self.sequence(n)
            if _split_key(text) is not None:
                return self.mapping(n)
            raise Unsupported("multi-line plain scalar or a bare scalar")
        finally:
            self.depth -= 1

    def mapping(self, n: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        while True:
            head = self.peek()
            if head is None or head[0] < n:
                return out
            if head[0] > n:
                raise Unsupported("indentation")
            entry = _split_key(head[1])
            if entry is None:
                if head[1] == "-" or head[1].startswith("- "):
                    raise Unsupported("a sequence where a key was expected")
                raise Unsupported("not a mapping entry")
            key, rest = entry
            try:
                if key in out:
                    raise Unsupported("duplicate key")
            except TypeError:
                raise Unsupported("unhashable key") from None
            self.i += 1
            if rest:
                out[key] = self.inline(rest, n)
                continue
            nxt = self.peek()
            if nxt is not None and nxt[0] > n:
                out[key] = self.node(nxt[0])
            elif nxt is not None and nxt[0] == n and (nxt[1] == "-" or nxt[1].startswith("- ")):
                out[key] = self.sequence(n)
            else:
                out[key] = None

    def sequence(self, n: int) -> list[Any]:
        out: list[Any] = []
        while True:
            head = self.peek()
            if head is None or head[0] < n:
                return out
            if head[0] > n:
                raise Unsupported("indentation")
            text = head[1]
            if not (text == "-" or text.startswith("- ")):
                return out  # a key of the mapping this sequence is the value of
            if text == "-":
                self.i += 1
                nxt = self.peek()
                out.append(self.node(nxt[0]) if nxt is not None and nxt[0] > n else None)
                continue
            rest = text[2:].lstrip(" ")
            m = n + len(text) - len(rest)
            if rest == "-" or rest.startswith("- "):
                raise Unsupported("compact nested sequence")
            if rest[0] not in "|>[{" and _split_key(rest) is not None:
                # a mapping that starts on the dash's line: read it as if it began on its own
                # line at the column of its first key
                self.lines[self.i] = " " * m + self.lines[self.i][m:]
                self.depth += 1
                if self.depth > MAX_DEPTH:
                    raise Unsupported("deep")
                try:
                    out.append(self.mapping(m))
                finally:
                    self.depth -= 1
                continue
            self.i += 1
            out.append(self.inline(rest, n))

    def inline(self, rest: str, n: int) -> Any:
        """A value that starts on the line just read (whose parent is at indent ``n``)."""
        c = rest[0]
        if c == "|":
            return self.literal(rest, n)
        if c == "[":
            value: Any = _flow_sequence(rest)
        elif c == "{":
            if rest != "{}":
                raise Unsupported("flow mapping")
            value = {}
        elif c in "'\"":
            value, after = _quoted(rest)
            if after.strip(" "):
                raise Unsupported("text after a quoted scalar")
        else:
            value = _plain(rest)
        nxt = self.peek()
        if nxt is not None and nxt[0] > n:
            raise Unsupported("continued on the next line")
        return value

    def literal(self, header: str, n: int) -> str:
        """A ``|`` block scalar; its header line has been read (comment already cut)."""
        chomp = header[1:2] if header[1:2] in ("-", "+") else ""
        if header[1 + len(chomp):]:
            raise Unsupported("indentation indicator")
        lines = self.lines
        indent = 0
        raw: list[str] = []
        j = self.i
        while j < len(lines):
            line = lines[j]
            stripped = line.lstrip(" ")
            lead = len(line) - len(stripped)
            if stripped:
                if not indent:
                    if lead <= n:
                        break
                    indent = lead
                elif lead < indent:
                    if lead > n:
                        raise Unsupported("a less indented line in a block scalar")
                    break
            raw.append(line)
            j += 1
        if not indent:
            raise Unsupported("empty block scalar")
        if any(len(line) > indent for line in raw if not line.strip(" ")):
            raise Unsupported("white space on a blank line of a block scalar")
        self.i = j
        content = [line[indent:] for line in raw]
        trailing = 0
        while not content[-1]:
            content.pop()
            trailing += 1
        text = "\n".join(content)
        if chomp == "-":
            return text
        return text + "\n" * (1 + (trailing if chomp == "+" else 0))
