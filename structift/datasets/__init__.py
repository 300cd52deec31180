"""Corpus loaders: the tagged Brown corpus and CoNLL-style column files."""

from structift.datasets._fetch import cache_dir, nltk_data_dirs
from structift.datasets.brown import (
    BROWN_NPM_SPEC,
    TaggedSentence,
    base_tag,
    brown_categories,
    brown_news_split,
    brown_root,
    brown_tagged_sents,
    split_tagged_token,
)
from structift.datasets.conll import read_conll, write_conll

__all__ = [
    "BROWN_NPM_SPEC",
    "TaggedSentence",
    "base_tag",
    "brown_categories",
    "brown_news_split",
    "brown_root",
    "brown_tagged_sents",
    "cache_dir",
    "nltk_data_dirs",
    "read_conll",
    "split_tagged_token",
    "write_conll",
]
