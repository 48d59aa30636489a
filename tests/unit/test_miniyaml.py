"""The subset YAML reader (vmforge.seed.miniyaml) held to PyYAML through vmforge.yamlload.

Whatever it reads, it must read exactly as PyYAML does (same values, same types: ``yes`` is
True, ``0:`` an int key); what it does not read it must refuse, never guess. It is run on
every cloud-init example, on variants of them and on hand-made corner cases; and it must read
most real cloud-configs, or it would not be worth having.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmforge import yamlload
from vmforge.seed import miniyaml

DATA = Path(__file__).parent / "data"
TEXTS = {name: text
         for file in ("cloud-init-module-examples.json", "cloud-init-library-examples.json",
                      "cloud-init-network-examples.json")
         for name, text in json.loads((DATA / file).read_text())["examples"].items()}


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (True is not 1 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) \
            and all(type(x) is type(y) for x, y in zip(a, b, strict=True))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check(text: str) -> str:
    """'read' (both agree), 'refused' (the subset said so) or 'invalid' (PyYAML refuses it:
    then the subset must refuse it too)."""
    try:
        want = yamlload.load(text, allow_duplicates=True)
    except (yaml.YAMLError, RecursionError):
        with pytest.raises(miniyaml.Unsupported):
            miniyaml.load(text)
        return "invalid"
    try:
        got = miniyaml.load(text)
    except miniyaml.Unsupported:
        return "refused"
    assert same(got, want), (text, got, want)
    return "read"


def test_cloud_init_examples_read_alike() -> None:
    outcomes = [check(text) for text in TEXTS.values()]
    # it is worth having: most of cloud-init's own examples are in the subset
    assert outcomes.count("read") > len(outcomes) * 0.6, outcomes.count("read")


def _variants(text: str, rng: random.Random, n: int) -> list[str]:
    lines = text.split("\n")
    pieces = ["yes", "No", "on", "~", "null", "0", "-1", "010", "0x1F", "1.5", "1_000",
              "2024-01-02", ".inf", "'q''s'", '"a\\tb"', '"\\u00e9"', "[a, 1, 'b']", "[]",
              "{}", "|", "|-", "|+", ">", "&a x", "*a", "!!str 1", "- x", "a: b", "a:b",
              "x # c", "'#x'", "-foo", ".bashrc", "=", "<<", "?x", "@x", "`x`", ""]
    out = []
    for _ in range(n):
        ls = list(lines)
        k = rng.randrange(len(ls))
        op = rng.randrange(5)
        line = ls[k]
        if op == 0 and ": " in line:  # another value
            head = line.split(": ", 1)[0]
            ls[k] = f"{head}: {rng.choice(pieces)}"
        elif op == 1:  # indentation changed
            ls[k] = " " * rng.randrange(4) + line.lstrip(" ")
        elif op == 2:  # a line removed
            del ls[k]
        elif op == 3:  # a line repeated
            ls.insert(k, line)
        else:  # a new line
            ls.insert(k, " " * rng.randrange(6) + rng.choice(pieces))
        out.append("\n".join(ls))
    return out


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_variants_read_alike(name: str) -> None:
    rng = random.Random(name)
    for text in _variants(TEXTS[name], rng, 25):
        check(text if text.endswith("\n") else text + "\n")


@pytest.mark.parametrize("text", [
    "a: 1\n", "a: yes\nb: No\nc: ON\nd: off\n", "a: ~\nb: null\nc:\n", "0: x\ntrue: y\n",
    "a: -1\nb: +2\nc: 0\n", "a: -foo\nb: .bashrc\n", "a: 'it''s'\n", 'a: "x\\ty\\u00e9"\n',
    "a: [1, b, 'c d', \"e\"]\n", "a: []\nb: {}\n", "- a\n- b: 1\n  c: 2\n-\n  - x\n",
    "a:\n- 1\n- 2\nb: 3\n", "a: |\n  x\n   y\n\n  z\n\nb: 1\n", "a: |-\n  x\n\n",
    "a: |+\n  x\n\n\n", "a: 10.0.0.1\nb: 10.0.0.0/24\nc: 1.2.3\nd: 1.2\ne: 1:20\n",
    "a: | # c\n  x\n", "- |\n  x\n- y\n", "a: b # comment\n# full\nc: d\n",
    "a: x:y\n", "a: http://h/p?q=1#f\n", "a b: c\n", "a: 'x' # c\n", "a: b\n  c\n",
    "a: |\n x\n  y\n", "a:\n  b:\n    c: [x]\n", "'k': v\n", '"k k": v\n', "a: b: c\n",
    "a: 1\na: 2\n", "a: 010\n", "a: 1.0\n", "a: 2024-01-01\n", "a: !!str x\n", "a: &x 1\n",
    "a: >\n  x\n", "a:\tb\n", "a: b\r\n", "---\na: 1\n", "a: |\n  x\n # c\n", "a: |2\n  x\n",
    "- - a\n", "a: [a, [b]]\n", "a: [a,]\n", "a: [a\n", "a: 'x\n  y'\n", "a: -\n", "a: =\n",
    "a: <<\n", "? a\n: b\n", "a: '#'\n", "a: |\n  x\n  \n  y\n", "a: |\n  x\n   \n", "",
    "# only a comment\n", "x\n", "[a]\n", "a: -.inf\n", "a: .nan\n", "a: 0o7\n", "\ufeffa: 1\n",
])
def test_corners(text: str) -> None:
    if text and not text.endswith("\n"):
        with pytest.raises(miniyaml.Unsupported):
            miniyaml.load(text)
        return
    check(text)


def test_what_it_reads() -> None:
    """The subset really covers the everyday forms (otherwise it would just refuse all)."""
    text = ("#cloud-config\nhostname: web-1\nmanage_etc_hosts: true\npackages: [git, curl]\n"
            "users:\n  - name: dev\n    groups: [sudo]\n    lock_passwd: yes\n"
            "    ssh_authorized_keys:\n      - ssh-ed25519 AAAA dev@host\n"
            "write_files:\n- path: /etc/motd\n  permissions: '0644'\n  content: |\n"
            "    hello\n    world\nruncmd:\n  - [sh, -c, 'echo hi > /tmp/x']\n"
            "  - systemctl restart ssh\n")
    assert check(text) == "read"
    doc = miniyaml.load(text)
    assert doc["users"][0]["lock_passwd"] is True
    assert doc["write_files"][0]["content"] == "hello\nworld\n"


def test_deep_nesting_is_refused() -> None:
    text = "".join(" " * i + "a:\n" for i in range(150)) + " " * 150 + "b: 1\n"
    with pytest.raises(miniyaml.Unsupported):
        miniyaml.load(text)
