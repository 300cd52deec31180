"""The Turkish Web Treebank (Kayadelen, Öztürel & Bohnet, LREC 2020): locate, read, split.

Two CoNLL-U files, ``web.conllu`` (2,541 sentences, 32,422 words) and ``wiki.conllu`` (2,310
sentences, 48,948 words), from the PyPI package ``turkish-treebanks==1.0.0`` (Apache License
2.0). Words are inflectional groups: a surface word split into several words, the joins marked
``SpaceAfter=No`` and the groups linked by the ``ig`` relation. Every sentence has exactly one
word attached to ROOT; 315 sentences (120 web + 195 wiki) are non-projective.

Where the files come from (first hit wins), see `turkish_treebank_root`:

1. an explicit ``path`` argument (the folder holding both files, or one holding
   ``turkish-treebank/``);
2. ``$STRUCTIFT_DATA/turkish-treebank/``;
3. the user cache folder (``~/.cache/structift/turkish-treebanks-1.0.0``), filled on first use
   by ``pip download turkish-treebanks==1.0.0 --no-deps`` (the files are read out of the
   downloaded wheel or sdist and checked against their SHA-256);
4. otherwise a `FileNotFoundError` that says how to get the data.

The split (`turkish_treebank_split`): both files concatenated in file order (web, then wiki);
sentence ``i`` (0-based) goes to test if ``i % 10 == 9``, to dev if ``i % 10 == 8``, else to
train: 3,881 / 485 / 485 sentences.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from structift import config
from structift.datasets._fetch import cache_dir
from structift.datasets.conllu import DependencySentence, read_conllu

__all__ = [
    "TURKISH_TREEBANK_FILES",
    "TURKISH_TREEBANK_PIP_SPEC",
    "turkish_treebank_root",
    "turkish_treebank_sents",
    "turkish_treebank_split",
]

TURKISH_TREEBANK_PIP_SPEC = "turkish-treebanks==1.0.0"
#: The files, in split order, with the SHA-256 of the package's copies.
TURKISH_TREEBANK_FILES: dict[str, str] = {
    "web.conllu": "d6f92b12b74f367a36e30dd3d644d7a0bb01a991584602e6e69f1191664f86bf",
    "wiki.conllu": "58f049fae8d0653ba0940a58168c17c7cebbc50f88cad2985d12d34ac1b9acde",
}
_FOLDER = "turkish-treebank"


def _how_to_get() -> str:
    return (
        "Get the Turkish Web Treebank in one of these ways: pass the folder holding web.conllu "
        f"and wiki.conllu explicitly; set STRUCTIFT_DATA to a folder that contains {_FOLDER}/; "
        f"or make pip available so that structift can run `pip download "
        f"{TURKISH_TREEBANK_PIP_SPEC} --no-deps` into {cache_dir()} (or run it yourself and "
        "copy data/web.conllu and data/wiki.conllu out of the wheel)."
    )


def _is_treebank_dir(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in TURKISH_TREEBANK_FILES)


def turkish_treebank_root(
    path: str | os.PathLike[str] | None = None, *, download: bool = True
) -> Path:
    """Return the folder that holds ``web.conllu`` and ``wiki.conllu``.

    Args:
        path: That folder, or a folder that contains ``turkish-treebank/``. When given it
            must hold the files; nothing else is searched.
        download: Whether to fall back on ``pip download`` into the user cache folder.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: ``path`` or ``$STRUCTIFT_DATA`` is set but lacks the files, or no
            source has them; the message says how to get them.
    """
    if path is not None:
        p = Path(path).expanduser()
        for candidate in (p, p / _FOLDER):
            if _is_treebank_dir(candidate):
                return candidate
        raise FileNotFoundError(
            f"path={str(p)!r} holds no Turkish Web Treebank: expected a folder with web.conllu "
            f"and wiki.conllu (or one containing {_FOLDER}/). {_how_to_get()}"
        )
    env = config.data_dir()
    if env:
        candidate = Path(env).expanduser() / _FOLDER
        if _is_treebank_dir(candidate):
            return candidate
        raise FileNotFoundError(
            f"STRUCTIFT_DATA={env!r} has no {_FOLDER}/ folder with web.conllu and wiki.conllu. "
            f"Point STRUCTIFT_DATA at the folder that contains {_FOLDER}/, or unset it."
        )
    cached = cache_dir() / TURKISH_TREEBANK_PIP_SPEC.replace("==", "-")
    if _is_treebank_dir(cached):
        return cached
    if download:
        try:
            return pip_download_treebank(cached)
        except (FileNotFoundError, RuntimeError, OSError, subprocess.SubprocessError) as err:
            raise FileNotFoundError(
                f"The Turkish Web Treebank was not found and fetching it failed ({err}). "
                f"{_how_to_get()}"
            ) from err
    raise FileNotFoundError(f"The Turkish Web Treebank was not found. {_how_to_get()}")


def _pip_command() -> list[str]:
    """The ordinary pip client: this interpreter's ``pip`` module, else ``pip`` on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for name in ("pip", "pip3"):
        found = shutil.which(name)
        if found:
            return [found]
    raise FileNotFoundError("pip is neither importable nor on PATH")


def pip_download_treebank(dest: Path, *, timeout: float = 600.0) -> Path:
    """Fill ``dest`` with the two CoNLL-U files of the PyPI package, via ``pip download``.

    Only ``data/web.conllu``, ``data/wiki.conllu`` and the licence are read out of the
    archive (a wheel, or an sdist tarball); nothing is installed or executed. The folder is
    written atomically: filled next to ``dest``, then renamed.

    Args:
        dest: The folder to create.
        timeout: Seconds to wait for pip.

    Returns:
        ``dest``.

    Raises:
        FileNotFoundError: pip is not available.
        RuntimeError: pip failed, or the archive lacks the files or they fail their checksum.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-download-") as tmp:
        tmp_path = Path(tmp)
        cmd = [*_pip_command(), "download", TURKISH_TREEBANK_PIP_SPEC, "--no-deps"]
        proc = subprocess.run(
            [*cmd, "--dest", str(tmp_path / "dist")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        archives = sorted((tmp_path / "dist").glob("*"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(
                f"`pip download {TURKISH_TREEBANK_PIP_SPEC} --no-deps` failed (exit code "
                f"{proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        staging = tmp_path / "files"
        staging.mkdir()
        _copy_members(_archive_members(archives[0]), staging, archives[0].name)
        if dest.exists():  # another process finished first
            return dest
        staging.rename(dest)
    return dest


def _archive_members(archive: Path) -> dict[str, bytes]:
    """Read the CoNLL-U files (``…/data/<name>``) and a LICENSE out of a wheel or tarball."""
    wanted = set(TURKISH_TREEBANK_FILES)
    found: dict[str, bytes] = {}

    def keep(name: str) -> str | None:
        parts = PurePosixPath(name).parts
        if len(parts) >= 2 and parts[-2] == "data" and parts[-1] in wanted:
            return parts[-1]
        return "LICENSE" if parts and parts[-1] == "LICENSE" else None

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                key = keep(info.filename)
                if key and not info.is_dir():
                    found.setdefault(key, z.read(info))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                key = keep(member.name)
                extracted = tar.extractfile(member) if member.isfile() and key else None
                if key and extracted is not None:
                    found.setdefault(key, extracted.read())
    else:
        raise RuntimeError(f"{archive.name} is neither a wheel (zip) nor an sdist (tar)")
    return found


def _copy_members(found: dict[str, bytes], dest: Path, archive: str) -> None:
    for name, digest in TURKISH_TREEBANK_FILES.items():
        if name not in found:
            raise RuntimeError(f"{archive} has no data/{name}")
        got = hashlib.sha256(found[name]).hexdigest()
        if got != digest:
            raise RuntimeError(f"{archive}: data/{name} has SHA-256 {got}, expected {digest}")
    for name, data in found.items():
        (dest / name).write_bytes(data)


def turkish_treebank_sents(
    path: str | os.PathLike[str] | None = None, *, download: bool = True
) -> list[DependencySentence]:
    """Read all sentences: ``web.conllu`` then ``wiki.conllu``, each in file order.

    Args:
        path: See `turkish_treebank_root`.
        download: See `turkish_treebank_root`.

    Returns:
        4,851 sentences (81,370 words) with the published files.
    """
    root = turkish_treebank_root(path, download=download)
    return [s for name in TURKISH_TREEBANK_FILES for s in read_conllu(root / name)]


def turkish_treebank_split(
    path: str | os.PathLike[str] | None = None, *, download: bool = True
) -> tuple[list[DependencySentence], list[DependencySentence], list[DependencySentence]]:
    """Return ``(train, dev, test)``: sentence ``i`` of `turkish_treebank_sents` goes to test
    if ``i % 10 == 9``, to dev if ``i % 10 == 8``, else to train (3,881 / 485 / 485).

    Args:
        path: See `turkish_treebank_root`.
        download: See `turkish_treebank_root`.
    """
    sents = turkish_treebank_sents(path, download=download)
    train = [s for i, s in enumerate(sents) if i % 10 < 8]
    dev = [s for i, s in enumerate(sents) if i % 10 == 8]
    test = [s for i, s in enumerate(sents) if i % 10 == 9]
    return train, dev, test
