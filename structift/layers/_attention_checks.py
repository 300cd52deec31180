"""Argument checks of the attention layers (errors name the argument, got and expected)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_binary",
    "check_choice",
    "check_query_key_value",
    "check_scores",
    "valid_mask",
]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def valid_mask(
    scores: Tensor, lengths: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Return ``(lengths [*batch], valid [*batch, T])`` from ``lengths`` or a prefix ``mask``."""
    batch, T = scores.shape[:-1], scores.shape[-1]
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both.")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = valid key), got {mask.dtype}.")
        if mask.shape != scores.shape or mask.device != scores.device:
            raise ValueError(
                f"mask must have the shape {tuple(scores.shape)} and device {scores.device} of "
                f"the scores ([B, T] for one query per sequence), got {tuple(mask.shape)} on "
                f"{mask.device}."
            )
        lengths = mask.sum(-1)
        prefix = torch.arange(T, device=mask.device) < lengths.unsqueeze(-1)
        if not torch.equal(prefix, mask):
            raise ValueError(
                "mask must mark a prefix of each sequence as valid (True…True False…False): "
                "structured attention runs a chain over the valid keys. Pass lengths instead, "
                "or give isolated keys a score of -inf."
            )
    if lengths is None:
        lengths = torch.full(batch, T, dtype=torch.long, device=scores.device)
    if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point or lengths.is_complex():
        raise TypeError(
            f"lengths must be an integer tensor, got {type(lengths).__name__} "
            f"{getattr(lengths, 'dtype', '')}."
        )
    # lengths are indices, often built on the CPU: follow the scores instead of refusing
    lengths = lengths.to(scores.device)
    if lengths.shape != batch:
        if lengths.dim() == 1 and len(batch) >= 1 and lengths.shape[0] == batch[0]:
            # one length per sequence, shared by all of its queries
            lengths = lengths.view(-1, *([1] * (len(batch) - 1))).expand(batch)
        else:
            raise ValueError(
                f"lengths must have shape [B] = {tuple(batch[:1])} or {tuple(batch)}, "
                f"got {tuple(lengths.shape)}."
            )
    lengths = lengths.long()
    if lengths.numel() and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(
            f"lengths must lie in [1, T={T}], got values in "
            f"[{int(lengths.min())}, {int(lengths.max())}]."
        )
    valid = torch.arange(T, device=scores.device) < lengths.unsqueeze(-1)
    return lengths, valid


def check_scores(scores: Tensor, valid: Tensor, kind: str) -> None:
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}.")
    if scores.dim() < 2 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have shape [B, T] or [B, M, T], got {tuple(scores.shape)}.")
    bad = (torch.isnan(scores) | (scores == float("inf"))) & valid
    if bad.any():
        raise ValueError(
            "scores contain NaN or +inf at valid (unpadded) keys; check the query and key "
            "inputs (padded keys may hold anything)."
        )
    if kind != "structured":
        finite = torch.isfinite(scores) & valid
        if not finite.any(-1).all():
            raise ValueError(
                f"{kind} attention needs at least one finite score per row among the valid "
                "keys; some row has only -inf scores."
            )


def check_binary(binary: Tensor, scores: Tensor) -> Tensor:
    """Return ``binary`` broadcast to ``[*batch, T-1, 2, 2]``."""
    batch, T = scores.shape[:-1], scores.shape[-1]
    if not isinstance(binary, Tensor):
        raise TypeError(f"binary must be a tensor, got {type(binary).__name__}.")
    if binary.dtype != scores.dtype or binary.device != scores.device:
        raise TypeError(
            f"binary is {binary.dtype} on {binary.device} but scores are {scores.dtype} on "
            f"{scores.device}: they must match."
        )
    target = (*batch, T - 1, 2, 2)
    if binary.dim() < 2 or binary.shape[-2:] != (2, 2):
        raise ValueError(
            f"binary must end in (2, 2) (pairwise potentials [from, to] of the selection "
            f"variables), got shape {tuple(binary.shape)}."
        )
    try:
        binary = torch.broadcast_to(binary, target)
    except RuntimeError:
        raise ValueError(
            f"binary of shape {tuple(binary.shape)} does not broadcast to {target} "
            "([*batch, T-1, 2, 2]); for per-sequence potentials pass [B, 1, 2, 2]."
        ) from None
    if torch.isnan(binary).any() or (binary == float("inf")).any():
        raise ValueError("binary contains NaN or +inf; pairwise potentials must be < +inf.")
    return binary


def check_query_key_value(query: Tensor, key: Tensor, value: Tensor | None) -> Tensor:
    """Check query [B, D] or [B, M, D], key [B, T, D], value [B, T, Dv]; return the value."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x is not None and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}.")
    value = key if value is None else value
    if key.dim() != 3:
        raise ValueError(f"key must have shape [B, T, D], got {tuple(key.shape)}.")
    B, T, D = key.shape
    if query.dim() not in (2, 3) or query.shape[0] != B or query.shape[-1] != D:
        raise ValueError(
            f"query must have shape [B, D] or [B, M, D] with B={B}, D={D} (from key), "
            f"got {tuple(query.shape)}."
        )
    if value.dim() != 3 or value.shape[:2] != (B, T):
        raise ValueError(
            f"value must have shape [B, T, Dv] with B={B}, T={T}, got {tuple(value.shape)}."
        )
    for name, x in (("query", query), ("value", value)):
        if x.dtype != key.dtype or x.device != key.device:
            raise TypeError(
                f"{name} is {x.dtype} on {x.device} but key is {key.dtype} on {key.device}: "
                "they must match."
            )
    return value
