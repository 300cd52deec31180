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
from structift.datasets.conllu import DependencySentence, is_projective, parse_conllu, read_conllu
from structift.datasets.turkish import (
    turkish_treebank_root,
    turkish_treebank_sents,
    turkish_treebank_split,
)

__all__ = [
    "BROWN_NPM_SPEC",
    "DependencySentence",
    "TaggedSentence",
    "base_tag",
    "brown_categories",
    "brown_news_split",
    "brown_root",
    "brown_tagged_sents",
    "cache_dir",
    "is_projective",
    "nltk_data_dirs",
    "parse_conllu",
    "read_conll",
    "read_conllu",
    "split_tagged_token",
    "turkish_treebank_root",
    "turkish_treebank_sents",
    "turkish_treebank_split",
    "write_conll",
]
