"""Argument checks of the attention layers (errors name the argument, got and expected)."""

from __future__ import annotations

import torch
from torch import Tensor

from structift._checks import check_float_tensor

__all__ = [
    "check_binary",
    "check_choice",
    "check_floating",
    "check_layer_inputs",
    "check_query_key_value",
    "check_scores",
    "check_size",
    "valid_mask",
]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def valid_mask(
    shape: tuple[int, ...], device: torch.device, lengths: object, mask: object
) -> tuple[Tensor, Tensor]:
    """Return ``(lengths [*batch], valid [*batch, T])`` from ``lengths`` or a prefix ``mask``.

    ``shape`` is the shape ``[*batch, T]`` of the scores, ``device`` theirs.
    """
    batch, T = tuple(shape[:-1]), shape[-1]
    if lengths is not None and mask is not None:
        raise ValueError("pass either lengths or mask, not both.")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be a bool tensor (True = valid key), got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}."
            )
        if tuple(mask.shape) != tuple(shape) or mask.device != device:
            raise ValueError(
                f"mask must have the shape {tuple(shape)} and device {device} of the scores "
                f"([B, T] for one query per sequence), got {tuple(mask.shape)} on {mask.device}."
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
        lengths = torch.full(batch, T, dtype=torch.long, device=device)
    if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point or lengths.is_complex():
        raise TypeError(
            f"lengths must be an integer tensor, got {type(lengths).__name__} "
            f"{getattr(lengths, 'dtype', '')}."
        )
    if lengths.dtype == torch.bool:
        # a bool tensor would silently be read as lengths 0 and 1
        raise TypeError(
            f"lengths must be an integer tensor (number of valid keys per sequence), got a bool "
            f"tensor of shape {tuple(lengths.shape)}: it looks like a mask. Pass "
            "lengths=mask.sum(-1), or pass it as mask=."
        )
    # lengths are indices, often built on the CPU: follow the scores instead of refusing
    lengths = lengths.to(device)
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
    valid = torch.arange(T, device=device) < lengths.unsqueeze(-1)
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
    if kind not in ("structured", "sparsemap"):  # the chains can always select nothing
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


def check_size(name: str, value: object) -> None:
    """Raise unless ``value`` is a positive Python int (a feature size)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be a feature size >= 1, got {value}.")


def check_floating(**tensors: object) -> None:
    """Raise TypeError unless every argument that is not None is a floating-point tensor."""
    for name, x in tensors.items():
        if x is not None:
            check_float_tensor(name, x, hint=" (or embed integer ids first)")


def check_query_key_value(query: Tensor, key: Tensor, value: Tensor | None) -> Tensor:
    """Check query [B, D] or [B, M, D], key [B, T, D], value [B, T, Dv]; return the value."""
    check_floating(query=query, key=key, value=value)
    value = key if value is None else value
    if key.dim() != 3:
        raise ValueError(f"key must have shape [B, T, D], got {tuple(key.shape)}.")
    B, T, D = key.shape
    if D == 0:
        raise ValueError(
            f"key must have a feature size D >= 1 (scores are <q, k> / sqrt(D)), got shape "
            f"{tuple(key.shape)} with D = 0; give the keys at least one feature."
        )
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


def check_layer_inputs(
    query: Tensor, key: Tensor, value: Tensor | None, key_dim: int, query_dim: int | None
) -> None:
    """Raise unless query/key/value are float tensors with a layer's feature sizes.

    ``query`` must end in ``query_dim`` (``key_dim`` without a query projection), ``key`` in
    ``key_dim``; the remaining checks are `check_query_key_value`'s.
    """
    check_floating(query=query, key=key, value=value)
    query_size, query_origin = (
        (key_dim, "key_dim") if query_dim is None else (query_dim, "query_dim")
    )
    for name, x, size, origin in (
        ("query", query, query_size, query_origin),
        ("key", key, key_dim, "key_dim"),
    ):
        if x.dim() >= 1 and x.shape[-1] != size:
            raise ValueError(
                f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}), but the layer "
                f"was built with {origin}={size} (key_dim={key_dim}); pass {name} [..., {size}] "
                f"or build the layer with {origin}={x.shape[-1]}."
            )
