"""CoNLL-style column reader and writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from structift.datasets import read_conll, write_conll


def test_round_trip(tmp_path: Path) -> None:
    sents = [[("The", "DT"), ("cat", "NN")], [("Hi", "UH")]]
    path = tmp_path / "x.conll"
    write_conll(sents, path)
    assert read_conll(path) == sents


def test_first_and_last_columns_docstart_comments_and_blank_runs(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n# sent_id = 1\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
        "\n\n\nGerman  JJ B-NP   B-MISC\n",
        encoding="utf-8",
    )
    assert read_conll(path) == [[("EU", "B-ORG"), ("rejects", "O")], [("German", "B-MISC")]]
    assert read_conll(path, tag_column=1) == [
        [("EU", "NNP"), ("rejects", "VBZ")],
        [("German", "JJ")],
    ]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path="):
        read_conll(tmp_path / "missing.conll")
    bad = tmp_path / "bad.conll"
    bad.write_text("word TAG\nlonely\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.conll:2: expected at least two"):
        read_conll(bad)
    with pytest.raises(ValueError, match="out of range"):
        read_conll(_two_cols(tmp_path), tag_column=5)
    with pytest.raises(ValueError, match="whitespace"):
        write_conll([[("a b", "X")]], tmp_path / "w.conll")


def _two_cols(tmp_path: Path) -> Path:
    p = tmp_path / "two.conll"
    p.write_text("a X\n", encoding="utf-8")
    return p
