"""Every relative link in README.md and docs/ points at a file (or folder) that exists, and a
``#fragment`` into a Markdown page names one of its headings.

Links are Markdown ``[text](target)`` and ``![alt](target)``, read outside fenced code blocks
and inline code spans; ``http(s):`` and ``mailto:`` targets are not checked. A heading's anchor
is GitHub's: lowercased, characters other than letters, digits, spaces, ``-`` and ``_``
dropped, spaces turned into ``-``, and ``-1``, ``-2``... appended to repeats.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[str]:
    """README.md and every .md file under docs/, as paths relative to the repository root."""
    files = ["README.md"]
    for folder, _, names in os.walk(os.path.join(ROOT, "docs")):
        files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".md")]
    return sorted(files)


def prose(text: str) -> str:
    """``text`` with fenced code blocks and inline code spans blanked (line breaks kept, so
    offsets still give line numbers)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return _CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), "\n".join(out))


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose of ``text``; a link's text may span
    lines."""
    body = prose(text)
    return [(body.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(body)]


def slug(heading: str) -> str:
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    heading = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The anchors GitHub gives the headings of the Markdown file ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text).split("\n"):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:


def read(relpath: str) -> str:
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        return f.read()


def broken_links(relpath: str) -> list[str]:
    """Each link of ``relpath`` whose target is missing, as ``file:line: target (why)``."""
    path = os.path.join(ROOT, relpath)
    bad = []
    for number, target in links(read(relpath)):
        if _SCHEME.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = path if not file_part else os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        where = f"{relpath}:{number}: {target}"
        if not os.path.exists(dest):
            bad.append(f"{where} (no such file: {os.path.relpath(dest, ROOT)})")
        elif fragment and dest.endswith(".md") and fragment not in anchors(dest):
            bad.append(f"{where} (no heading with anchor #{fragment} in {os.path.relpath(dest, ROOT)})")
    return bad


@pytest.mark.parametrize("relpath", markdown_files())
def test_relative_links_resolve(relpath):
    assert broken_links(relpath) == []


def test_every_docs_page_is_reachable_from_the_readme():
    """Each page under docs/ is linked from the README or from a page the README links to (a
    link to a folder reaches the pages in it)."""
    reachable, todo = set(), ["README.md"]
    while todo:
        relpath = todo.pop()
        if relpath in reachable:
            continue
        reachable.add(relpath)
        for _, target in links(read(relpath)):
            file_part = target.partition("#")[0]
            if not file_part or _SCHEME.match(file_part):
                continue
            dest = os.path.normpath(os.path.join(ROOT, os.path.dirname(relpath), file_part))
            if os.path.isdir(dest):
                todo += [os.path.relpath(os.path.join(dest, n), ROOT) for n in os.listdir(dest)
                         if n.endswith(".md")]
            elif dest.endswith(".md") and os.path.exists(dest):
                todo.append(os.path.relpath(dest, ROOT))
    assert sorted(set(markdown_files()) - reachable) == []


def test_the_check_catches_a_missing_file_and_a_missing_heading(tmp_path, monkeypatch):
    """The check itself: a link to a missing file and one to a missing heading are reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some section (Sec. 4.2)\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-section-sec-42) [ok](#top-heading) `[code](x.md)`\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#nope) [web](https://example.com) [a link\n"
        "over two lines](docs/gone.md)\n"
        "```\n[fenced](also-missing.md)\n```\n# Top heading\n"
    )
    assert broken_links("README.md") == [
        "README.md:2: docs/missing.md (no such file: docs/missing.md)",
        "README.md:2: docs/a.md#nope (no heading with anchor #nope in docs/a.md)",
        "README.md:2: docs/gone.md (no such file: docs/gone.md)",
    ]
