"""English technical prose: the paragraphs of the Python 3.11 documentation's reST sources.

Data: the Debian package ``python3.11-doc`` (``apt-get install -y python3.11-doc``) puts the
``*.rst.txt`` sources of the HTML docs in ``/usr/share/doc/python3.11/html/_sources``; set
``$L2FX_PYDOC_SOURCES`` to another folder of ``*.rst.txt`` files to read those instead.

:func:`doc_paragraphs` keeps prose only (no code, tables, lists, headings or directive bodies
other than prose ones such as ``.. function::``), inline markup reduced to its text.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from .common import ZooError, data_root

__all__ = ["DEFAULT_DIR", "ENV_VAR", "MIN_WORDS", "rst_paragraphs", "doc_paragraphs"]

# Where the Debian package python3.11-doc installs them (`dpkg -L python3.11-doc`).
DEFAULT_DIR = Path("/usr/share/doc/python3.11/html/_sources")
ENV_VAR = "L2FX_PYDOC_SOURCES"
MIN_WORDS = 30

# Directives whose body is prose (kept); every other directive's body is skipped
# (code-block, productionlist, index, toctree, tables, comments, ...).
_PROSE_DIRECTIVES = frozenset(
    "function method class attribute data exception decorator decoratormethod classmethod "
    "staticmethod abstractmethod describe cmdoption option envvar opcode pdbcommand module "
    "note warning seealso versionadded versionchanged deprecated deprecated-removed "
    "impl-detail important tip caution attention hint admonition topic sidebar".split()
)
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::")
# Inline markup -> plain text, applied in order.
_INLINE_RULES = (
    (re.compile(r":[\w:+-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`text <target>`
    (re.compile(r":[\w:+-]+:`[~!]?([^`]*)`"), r"\1"),          # :func:`~os.path.join`
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),         # `text <url>`_
    (re.compile(r"``([^`]*)``"), r"\1"),                       # ``literal``
    (re.compile(r"`([^`]*)`_{0,2}"), r"\1"),                   # `text`_ / `interpreted`
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),                   # **strong**
    (re.compile(r"(?<!\w)\*([^*\s][^*]*)\*"), r"\1"),          # *emphasis*
    (re.compile(r"\s*\[(?:#\w*|\d+)\]_"), ""),                 # footnote references
    (re.compile(r"\|(\w[\w ]*)\|"), r"\1"),                    # |substitution|
    (re.compile(r"\s+"), " "),
)
_HEADING = re.compile(r"^([=\-~^*#+\"'`:.])\1{2,}\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _clean_inline(text: str) -> str:
    for pattern, repl in _INLINE_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


def rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one reST source, in order.

    Skips: directive and comment blocks (except prose directives such as ``.. function::``
    whose body is kept), literal blocks after ``::``, doctests, headings, tables and list
    items. Keeps paragraphs of at least ``MIN_WORDS`` words, inline markup removed.
    """
    out: list[str] = []
    block: list[str] = []
    skip_deeper_than: int | None = None  # skip lines indented more than this
    in_directive_header = False  # signature continuation and :options: up to a blank line

    def flush():
        nonlocal skip_deeper_than
        if not block:
            return
        first = block[0].lstrip()
        raw = " ".join(line.strip() for line in block)
        block.clear()
        if raw.endswith("::"):  # what follows, indented deeper, is a literal block
            skip_deeper_than = block_indent
            raw = raw[:-2].rstrip() + ":" if not raw.endswith(" ::") else raw[:-3]
        if (
            first.startswith((">>>", "+-", "|", "* ", "- ", "#. ", "..", ":"))
            or re.match(r"\d+\.\s", first)
            or any(_HEADING.match(part) for part in raw.split(" ") if len(part) > 2)
        ):
            return
        para = _clean_inline(raw)
        words = para.split()
        letters = sum(c.isalpha() for c in para)
        if len(words) >= MIN_WORDS and letters >= 0.6 * len(para):
            out.append(para)

    block_indent = 0
    for line in text.splitlines():
        line = line.expandtabs(8).rstrip()
        if not line:
            flush()
            in_directive_header = False
            continue
        ind = _indent(line)
        if skip_deeper_than is not None:
            if ind > skip_deeper_than:
                continue
            skip_deeper_than = None
        if in_directive_header:
            continue
        stripped = line.lstrip()
        if stripped.startswith(".."):
            flush()
            m = _DIRECTIVE.match(stripped)
            if m and m.group(1).split(":")[-1] in _PROSE_DIRECTIVES:
                in_directive_header = True
            else:
                skip_deeper_than = ind
            continue
        if _HEADING.match(stripped):
            block.clear()  # the title line above it is not prose
            continue
        if block and ind < block_indent:
            flush()
        if not block:
            block_indent = ind
        block.append(line)
    flush()
    return out


@functools.lru_cache(maxsize=1)
def doc_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs (>= 30 words) of the Python 3.11 docs sources, deduplicated.

    Order: source files sorted by path, paragraphs in file order.
    """
    root = data_root(ENV_VAR, DEFAULT_DIR)
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise ZooError(
            f"no *.rst.txt under {root}: apt-get install -y python3.11-doc "
            f"(or point ${ENV_VAR} at a folder of *.rst.txt sources)"
        )
    seen: set[str] = set()
    paragraphs = []
    for path in files:
        for para in rst_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            if para not in seen:
                seen.add(para)
                paragraphs.append(para)
    return tuple(paragraphs)
