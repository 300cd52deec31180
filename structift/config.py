"""The one place where structift reads its environment: defaults, never behaviour switches.

Code picks a chain backend with ``backend=`` or ``structift.structures.chain.use_backend``;
the variable only sets the default.

Every environment variable structift honours is read here, at the moment a default is needed,
and nowhere else in the package:

| variable | default for |
|---|---|
| ``STRUCTIFT_CHAIN_KERNEL`` | the chain backend (``auto``, ``fused``, ``scaled``, ``log``) |
| ``TRITON_INTERPRET`` | Triton's own: its kernels run through its CPU interpreter |
| ``STRUCTIFT_DATA`` | the folder holding ``brown/`` and ``turkish-treebank/`` |
| ``STRUCTIFT_CACHE``, ``XDG_CACHE_HOME`` | the user cache folder for downloaded data |
| ``NLTK_DATA``, ``APPDATA`` | NLTK's data search path (read the way NLTK reads it) |
"""

from __future__ import annotations

import os

__all__ = [
    "CHAIN_BACKENDS",
    "appdata",
    "chain_backend",
    "data_dir",
    "nltk_data",
    "structift_cache",
    "triton_interpret",
    "xdg_cache_home",
]

#: Names ``STRUCTIFT_CHAIN_KERNEL`` accepts.
CHAIN_BACKENDS = ("auto", "fused", "scaled", "log")


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def chain_backend() -> str:
    """The default chain backend's name (``STRUCTIFT_CHAIN_KERNEL``, else ``auto``).

    Raises:
        ValueError: an unknown name, with the accepted ones.
    """
    name = _get("STRUCTIFT_CHAIN_KERNEL") or "auto"
    if name not in CHAIN_BACKENDS:
        raise ValueError(
            f"STRUCTIFT_CHAIN_KERNEL must be one of {CHAIN_BACKENDS}; got {name!r}. Unset it for "
            "auto, or choose a backend in code with structift.structures.chain.use_backend."
        )
    return name


def triton_interpret() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _get("TRITON_INTERPRET") == "1"


def data_dir() -> str | None:
    """``$STRUCTIFT_DATA``: the folder with the data sets, if set."""
    return _get("STRUCTIFT_DATA")


def structift_cache() -> str | None:
    """``$STRUCTIFT_CACHE``: an explicit cache folder, if set."""
    return _get("STRUCTIFT_CACHE")


def xdg_cache_home() -> str | None:
    """``$XDG_CACHE_HOME``, if set."""
    return _get("XDG_CACHE_HOME")


def nltk_data() -> str | None:
    """``$NLTK_DATA`` (``os.pathsep``-separated folders), if set."""
    return _get("NLTK_DATA")


def appdata() -> str | None:
    """``%APPDATA%`` (Windows), if set."""
    return _get("APPDATA")
