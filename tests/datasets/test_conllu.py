"""CoNLL-U reader, projectivity, and the Turkish Web Treebank loader (sources and split)."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from structift.datasets import (
    DependencySentence,
    is_projective,
    parse_conllu,
    read_conllu,
    turkish_treebank_root,
    turkish_treebank_sents,
    turkish_treebank_split,
)
from structift.datasets import turkish as turkish_module

# Absolute: CI may give a path relative to the repository, and end-to-end runs use other cwds.
SHARED = Path(os.environ.get("STRUCTIFT_DATA", "/work/shared/data")).resolve()
HAVE_SHARED = all(
    (SHARED / "turkish-treebank" / f).is_file() for f in ("web.conllu", "wiki.conllu")
)


def row(*cols: object) -> str:
    return "\t".join(map(str, cols)) + "\n"


def word(i: int, form: str, upos: str, head: int, rel: str, misc: str = "_") -> str:
    return row(i, form, "_", upos, "_", "_", head, rel, "_", misc)


SAMPLE = (
    "# newdoc id = d1\n"
    "# sent_id = s1\n"
    "# text = Vámonos al mar.\n"
    + row("1-2", "Vámonos", *["_"] * 8)
    + word(1, "Vamos", "VERB", 0, "root")
    + word(2, "nos", "PRON", 1, "obj")
    + row("3-4", "al", *["_"] * 8)
    + word(3, "a", "ADP", 5, "case")
    + word(4, "el", "DET", 5, "det")
    + word(5, "mar", "NOUN", 1, "obl", "SpaceAfter=No")
    + row("5.1", "x", "_", "_", "_", "_", "_", "_", "1:dep", "_")
    + word(6, ".", "PUNCT", 1, "punct")
    + "\n\n"
    + "# sent_id = s2\n"
    + word(1, "Hi", "INTJ", 0, "root", "SpaceAfter=No|Foo=Bar")
    + word(2, "!", "PUNCT", 1, "punct")
)


class TestReader:
    def test_words_tags_heads_and_comments(self, tmp_path: Path) -> None:
        path = tmp_path / "a.conllu"
        path.write_text(SAMPLE, encoding="utf-8")
        first, second = read_conllu(path)
        assert first.words == ["Vamos", "nos", "a", "el", "mar", "."]
        assert first.upos == ["VERB", "PRON", "ADP", "DET", "NOUN", "PUNCT"]
        assert first.heads == [0, 1, 5, 5, 1, 1]
        assert first.deprels == ["root", "obj", "case", "det", "obl", "punct"]
        assert (first.sent_id, first.text) == ("s1", "Vámonos al mar.")
        assert len(first) == 6
        # The empty node 5.1 is skipped; the multiword ranges are kept.
        assert first.multiword == [(1, 2, "Vámonos"), (3, 4, "al")]
        assert first.space_after == [True, True, True, True, False, True]
        # The last sentence needs no blank line after it.
        assert second == DependencySentence(
            words=["Hi", "!"],
            upos=["INTJ", "PUNCT"],
            heads=[0, 1],
            deprels=["root", "punct"],
            space_after=[False, True],
            sent_id="s2",
        )

    def test_crlf_and_blank_runs(self) -> None:
        text = "\r\n\r\n" + SAMPLE.replace("\n", "\r\n") + "\r\n\r\n\r\n"
        sents = parse_conllu(io.StringIO(text))
        assert [len(s) for s in sents] == [6, 2]

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="path="):
            read_conllu(tmp_path / "missing.conllu")


def _bad(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.conllu"
    path.write_text(text, encoding="utf-8")
    return path


class TestMalformed:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("1 a _ X _ _ 0 root _ _\n", r"bad.conllu:1: expected 10 tab-separated columns"),
            (word(1, "a", "X", 0, "root") + "2\tb\tX\n", r"bad.conllu:2: .*got 3"),
            (word(1, "a", "X", 0, "root") + word(3, "b", "X", 1, "dep"), r":2: .*expected 2"),
            (row("x", "a", *["_"] * 8), r":1: ID 'x' is not a word ID"),
            (row("0", "a", *["_"] * 8), r":1: ID '0' is not a word ID"),
            (row("1", "a", "_", "X", "_", "_", "_", "root", "_", "_"), r":1: HEAD '_'"),
            (row("1", "a", "_", "X", "_", "_", "-1", "root", "_", "_"), r":1: HEAD '-1'"),
            ("# c\n" + row("2-3", "ab", *["_"] * 8), r":2: multiword token ID '2-3'"),
            (row("1-1", "ab", *["_"] * 8).replace("1-1", "2-1"), r":1: multiword"),
            (row("1-0", "ab", *["_"] * 8), r":1: ID '1-0'"),
        ],
    )
    def test_line_errors_name_file_and_line(self, tmp_path: Path, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            read_conllu(_bad(tmp_path, text))

    def test_head_out_of_range_names_the_word_line(self, tmp_path: Path) -> None:
        text = "# s\n" + word(1, "a", "X", 0, "root") + word(2, "b", "X", 7, "dep") + "\n"
        with pytest.raises(ValueError, match=r"bad.conllu:3: HEAD of word 2 points to word 7"):
            read_conllu(_bad(tmp_path, text))
        text = word(1, "a", "X", 0, "root") + word(2, "b", "X", 2, "dep")
        with pytest.raises(ValueError, match=r"bad.conllu:2: HEAD of word 2 points to itself"):
            read_conllu(_bad(tmp_path, text))

    def test_multiword_range_beyond_the_sentence(self, tmp_path: Path) -> None:
        text = (
            word(1, "a", "X", 0, "root") + row("2-3", "bc", *["_"] * 8) + word(2, "b", "X", 1, "d")
        )
        with pytest.raises(
            ValueError,
            match=r"bad.conllu:2: multiword token 2-3 .* beyond the sentence's last word 2",
        ):
            read_conllu(_bad(tmp_path, text))


class TestProjective:
    @pytest.mark.parametrize(
        ("heads", "projective"),
        [
            ([0], True),
            ([2, 0, 2], True),
            ([0, 1, 2, 3], True),
            ([3, 4, 0, 3], False),  # 1<-3 crosses 2<-4
            ([0, 4, 1, 1], False),  # 4->2 crosses 1->3
            ([2, 0, 1], False),  # ROOT->2 crosses 1->3
            ([0, 3, 1], True),
        ],
    )
    def test_hand_made_trees(self, heads: list[int], projective: bool) -> None:
        assert is_projective(heads) is projective


# ---- the loader's sources --------------------------------------------------------------------

FAKE = {
    "web.conllu": word(1, "a", "X", 0, "root") + "\n",
    "wiki.conllu": word(1, "b", "X", 2, "dep") + word(2, "c", "PUNCT", 0, "root") + "\n",
}
FAKE_DIGESTS = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in FAKE.items()}


def write_fake(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in FAKE.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No STRUCTIFT_DATA, an empty cache, the fake files' checksums, no pip."""
    monkeypatch.delenv("STRUCTIFT_DATA", raising=False)
    monkeypatch.setenv("STRUCTIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(turkish_module, "TURKISH_TREEBANK_FILES", FAKE_DIGESTS)

    def no_pip() -> list[str]:
        raise FileNotFoundError("pip is neither importable nor on PATH")

    monkeypatch.setattr(turkish_module, "_pip_command", no_pip)
    return tmp_path


FAKE_PIP = """
import io, sys, tarfile, zipfile
from pathlib import Path
open({log!r}, "w").write(" ".join(sys.argv[1:]))
if {fail!r}:
    sys.stderr.write("network unreachable\\n")
    sys.exit(1)
dest = Path(sys.argv[sys.argv.index("--dest") + 1])
dest.mkdir(parents=True)
files = {files!r}
if {kind!r} == "wheel":
    with zipfile.ZipFile(dest / "turkish_treebanks-1.0.0-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr("data/" + name, text)
        z.writestr("turkish_treebanks-1.0.0.dist-info/LICENSE", "Apache")
        z.writestr("turkish_treebanks/__init__.py", "")
else:
    with tarfile.open(dest / "turkish_treebanks-1.0.0.tar.gz", "w:gz") as tar:
        for name, text in [*files.items(), ("../LICENSE", "x")]:
            data = text.encode()
            info = tarfile.TarInfo("turkish_treebanks-1.0.0/data/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
"""


def install_fake_pip(
    monkeypatch: pytest.MonkeyPatch,
    tmp: Path,
    kind: str = "wheel",
    fail: bool = False,
    files: dict[str, str] = FAKE,
) -> Path:
    """Make the loader's pip a script that logs its arguments and writes an archive."""
    log = tmp / "pip-args.txt"
    script = tmp / "fake_pip.py"
    script.write_text(FAKE_PIP.format(log=str(log), fail=fail, files=files, kind=kind))
    monkeypatch.setattr(turkish_module, "_pip_command", lambda: [sys.executable, str(script)])
    return log


class TestSources:
    def test_explicit_path_folder_and_parent(self, isolated: Path) -> None:
        folder = write_fake(isolated / "data" / "turkish-treebank")
        assert turkish_treebank_root(folder) == folder
        assert turkish_treebank_root(isolated / "data") == folder

    def test_explicit_path_without_files_raises(self, isolated: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"path=.*holds no Turkish Web Treebank"):
            turkish_treebank_root(isolated)

    def test_structift_data(self, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        folder = write_fake(isolated / "data" / "turkish-treebank")
        monkeypatch.setenv("STRUCTIFT_DATA", str(isolated / "data"))
        assert turkish_treebank_root() == folder

    def test_structift_data_wrong_does_not_fall_back(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write_fake(isolated / "cache" / "turkish-treebanks-1.0.0")
        monkeypatch.setenv("STRUCTIFT_DATA", str(isolated / "nowhere"))
        with pytest.raises(FileNotFoundError, match="STRUCTIFT_DATA"):
            turkish_treebank_root()

    def test_cache_already_filled(self, isolated: Path) -> None:
        folder = write_fake(isolated / "cache" / "turkish-treebanks-1.0.0")
        assert turkish_treebank_root() == folder

    @pytest.mark.parametrize("kind", ["wheel", "sdist"])
    def test_pip_download_fallback(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch, kind: str
    ) -> None:
        log = install_fake_pip(monkeypatch, isolated, kind)
        root = turkish_treebank_root()
        assert root == isolated / "cache" / "turkish-treebanks-1.0.0"
        args = log.read_text().split()
        assert args[:3] == ["download", "turkish-treebanks==1.0.0", "--no-deps"]
        # Only the data and the licence are copied out (a "../LICENSE" member lands inside).
        assert sorted(p.name for p in root.iterdir()) == ["LICENSE", "web.conllu", "wiki.conllu"]
        assert [s.words for s in turkish_treebank_sents()] == [["a"], ["b", "c"]]
        log.unlink()  # the second call uses the cache
        assert turkish_treebank_root() == root and not log.exists()

    def test_checksum_mismatch_raises(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        install_fake_pip(monkeypatch, isolated, files={**FAKE, "web.conllu": "changed\n"})
        with pytest.raises(FileNotFoundError, match=r"data/web.conllu has SHA-256"):
            turkish_treebank_root()
        assert not (isolated / "cache" / "turkish-treebanks-1.0.0").exists()

    def test_archive_without_the_files_raises(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        install_fake_pip(monkeypatch, isolated, files={"web.conllu": FAKE["web.conllu"]})
        with pytest.raises(FileNotFoundError, match=r"has no data/wiki.conllu"):
            turkish_treebank_root()

    def test_pip_failure_raises_with_instructions(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        install_fake_pip(monkeypatch, isolated, fail=True)
        with pytest.raises(FileNotFoundError, match="network unreachable") as info:
            turkish_treebank_root()
        assert "STRUCTIFT_DATA" in str(info.value) and "pip download" in str(info.value)
        assert not (isolated / "cache" / "turkish-treebanks-1.0.0").exists()

    def test_no_pip_and_download_disabled(
        self, isolated: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with pytest.raises(FileNotFoundError, match="pip is neither importable") as info:
            turkish_treebank_root()
        assert "STRUCTIFT_DATA" in str(info.value)
        log = install_fake_pip(monkeypatch, isolated)
        with pytest.raises(FileNotFoundError, match="was not found"):
            turkish_treebank_root(download=False)
        assert not log.exists()

    def test_split_rule_on_fake_files(self, isolated: Path) -> None:
        # 2 sentences: both go to train (i % 10 < 8).
        train, dev, test = turkish_treebank_split(write_fake(isolated / "tb"))
        assert [len(s) for s in train] == [1, 2] and dev == [] and test == []


def test_archive_members_refuse_other_formats(tmp_path: Path) -> None:
    junk = tmp_path / "x.whl"
    junk.write_bytes(b"not an archive")
    with pytest.raises(RuntimeError, match="neither a wheel"):
        turkish_module._archive_members(junk)
    # A tarball member named like the data but outside data/ is not read.
    tgz = tmp_path / "y.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/web.conllu")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert turkish_module._archive_members(tgz) == {}
    whl = tmp_path / "z.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("data/web.conllu", "x")
    assert turkish_module._archive_members(whl) == {"web.conllu": b"x"}


# ---- the published treebank --------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_SHARED, reason="the shared Turkish treebank folder is not present")
class TestTurkishTreebank:
    def test_totals(self) -> None:
        sents = turkish_treebank_sents(SHARED)
        assert len(sents) == 4851
        assert sum(len(s) for s in sents) == 81_370
        assert sum(not is_projective(s.heads) for s in sents) == 315
        assert all(s.heads.count(0) == 1 for s in sents)
        web = read_conllu(turkish_treebank_root(SHARED) / "web.conllu")
        assert (len(web), sum(len(s) for s in web)) == (2541, 32_422)
        assert sents[0].sent_id == "tr-forum:00000222:S023"
        assert sents[0].words[:2] == ["Burda", "da"]

    def test_split(self) -> None:
        sents = turkish_treebank_sents(SHARED)
        train, dev, test = turkish_treebank_split(SHARED)
        assert (len(train), len(dev), len(test)) == (3881, 485, 485)
        assert dev[0].sent_id == sents[8].sent_id
        assert [s.sent_id for s in test[:2]] == [sents[9].sent_id, sents[19].sent_id]
        assert [s.sent_id for s in train[8:10]] == [sents[10].sent_id, sents[11].sent_id]
        ids = [s.sent_id for s in train + dev + test]
        assert sorted(ids) == sorted(s.sent_id for s in sents)
