"""Deprecated alias of `structift.structures.chain` (the chain moved with the redesign).

``import structift.chain`` keeps working for one release, with a ``DeprecationWarning``; use
``from structift.structures import chain``. The environment variable ``STRUCTIFT_CHAIN_KERNEL``
still sets the default backend; ``kernel_for`` is replaced by ``chain.resolve(None, unary)``.
"""

from __future__ import annotations

import warnings

from structift.structures.chain import (
    Fused,
    Log,
    Scaled,
    entropy,
    forward_backward,
    hvp,
    kl,
    log_partition,
    marginals,
    resolve,
    sample,
    score,
    use_backend,
    viterbi,
)

warnings.warn(
    "structift.chain moved to structift.structures.chain; import it from there (this alias "
    "goes away in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "Fused",
    "Log",
    "Scaled",
    "entropy",
    "forward_backward",
    "hvp",
    "kl",
    "log_partition",
    "marginals",
    "resolve",
    "sample",
    "score",
    "use_backend",
    "viterbi",
]
