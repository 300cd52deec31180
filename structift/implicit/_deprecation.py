"""Deprecation shims: renamed keyword arguments keep working for one release, with a warning.

(Kept in ``structift.implicit``, which imports nothing else from structift, so that every
subpackage can use it.)

structift uses one name per idea across the package (``max_iter``, ``tol``, ``damping``);
arguments that had another name (``max_iters``, ``steps``, ``terms``, ``step_size``) are
accepted under the old name through ``renamed_kwargs`` until the next release.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed_kwargs"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """Accept ``old=...`` for each ``old="new"`` pair, warning ``DeprecationWarning``.

    Passing both names raises a ``TypeError``.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__qualname__}: got both {old!r} and {new!r}; {old!r} is the "
                            f"deprecated name of {new!r}, pass only {new!r}"
                        )
                    warnings.warn(
                        f"{fn.__qualname__}: {old!r} is deprecated, use {new!r} (same meaning); "
                        "the old name goes away in the next release",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
