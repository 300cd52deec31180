"""CoNLL-style column files: one token per line, blank line between sentences.

The first column is the word and the last column the tag (any columns in between, such as
chunk or lemma columns, are ignored). Columns are separated by whitespace (tabs or spaces).
Lines starting with ``-DOCSTART-`` (CoNLL-2003 document markers) and ``#`` comment lines
before a sentence are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["read_conll", "write_conll"]


def read_conll(
    path: str | os.PathLike[str],
    *,
    word_column: int = 0,
    tag_column: int = -1,
) -> list[list[tuple[str, str]]]:
    """Read tagged sentences from a column file.

    Args:
        path: The file (UTF-8).
        word_column: Index of the word column (default the first).
        tag_column: Index of the tag column (default the last).

    Returns:
        A list of sentences, each a list of ``(word, tag)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A token line has fewer than two columns; the message gives the line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path={str(p)!r} is not a file")
    sents: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                if current:
                    sents.append(current)
                    current = []
                continue
            if line.startswith("-DOCSTART-") or (not current and line.startswith("#")):
                continue
            cols = line.split()
            if len(cols) < 2:
                raise ValueError(
                    f"{p}:{lineno}: expected at least two whitespace-separated columns "
                    f"(word ... tag), got {line!r}"
                )
            try:
                current.append((cols[word_column], cols[tag_column]))
            except IndexError:
                raise ValueError(
                    f"{p}:{lineno}: word_column={word_column} or tag_column={tag_column} out "
                    f"of range for {len(cols)} columns"
                ) from None
    if current:
        sents.append(current)
    return sents


def write_conll(sents: Iterable[Iterable[tuple[str, str]]], path: str | os.PathLike[str]) -> None:
    """Write tagged sentences as a two-column (word, tag) tab-separated file."""
    with Path(path).open("w", encoding="utf-8") as f:
        for sent in sents:
            for word, tag in sent:
                if any(c.isspace() for c in word) or any(c.isspace() for c in tag):
                    raise ValueError(f"word={word!r} / tag={tag!r} contain whitespace")
                f.write(f"{word}\t{tag}\n")
            f.write("\n")
