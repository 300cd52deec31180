"""Argument checks shared by the families.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, value or
device) with a message that names the argument, says what was given and what was expected.
The families call these only when ``validate_args`` is on, never inside a kernel loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = [
    "LOG_POTENTIAL",
    "check_float_tensor",
    "check_index_tensor",
    "check_lengths",
    "check_log_potential",
    "check_ndim",
    "check_same_dtype_device",
    "check_sample_shape",
    "lengths_from",
    "promote_under_autocast",
]


class _LogPotential(constraints.Constraint):
    """Real numbers or ``-inf`` (a hard zero of the potential); never NaN or ``+inf``."""

    is_discrete = False
    event_dim = 0

    def check(self, value: Tensor) -> Tensor:
        return ~(torch.isnan(value) | (value == float("inf")))

    def __repr__(self) -> str:
        return "LogPotential(real or -inf)"


LOG_POTENTIAL = _LogPotential()


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return type(x).__name__


def check_float_tensor(name: str, x: object, hint: str = "") -> Tensor:
    """Check that ``x`` is a floating-point tensor and return it.

    ``hint`` is appended to the message (e.g. "or embed integer ids first").

    Raises:
        TypeError: ``x`` is not a tensor or its dtype is not floating point.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of floating dtype; got {_describe(x)}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32 or float64); got dtype {x.dtype}. "
            f"Convert it with {name}.float() or {name}.double(){hint}."
        )
    return x


def check_ndim(name: str, x: Tensor, ndims: Sequence[int], expected: str) -> None:
    """Check that ``x.dim()`` is one of ``ndims``; ``expected`` describes the layout.

    Raises:
        ValueError: the number of dimensions is wrong.
    """
    if x.dim() not in ndims:
        raise ValueError(
            f"{name} must have shape {expected}; got shape {tuple(x.shape)} ({x.dim()}-D)."
        )


def check_log_potential(name: str, x: Tensor) -> None:
    """Check that ``x`` holds no NaN and no ``+inf`` (``-inf`` is a valid hard constraint).

    Raises:
        ValueError: naming the first offending index.
    """
    # One reduction decides the common case: a NaN or +inf entry makes the sum NaN or +inf,
    # so a finite or -inf sum proves there is neither. Only otherwise (or on overflow) do we
    # pay for the element-wise search that names the culprit.
    total = x.sum()
    if bool(torch.isfinite(total) | (total == float("-inf"))):
        return
    bad = torch.isnan(x) | (x == float("inf"))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = x[index].item()
        count = int(bad.sum())
        raise ValueError(
            f"{name} must be real or -inf (log-potentials); got {value} at index {index} "
            f"({count} bad entr{'y' if count == 1 else 'ies'} in shape {tuple(x.shape)})."
        )


def check_same_dtype_device(reference_name: str, reference: Tensor, **others: Tensor) -> None:
    """Check that every tensor in ``others`` has the dtype and device of ``reference``.

    Raises:
        TypeError: a dtype differs.
        ValueError: a device differs.
    """
    for name, x in others.items():
        if x.dtype != reference.dtype:
            raise TypeError(
                f"{name} must have the dtype of {reference_name} ({reference.dtype}); "
                f"got {x.dtype}."
            )
        if x.device != reference.device:
            raise ValueError(
                f"{name} must be on the device of {reference_name} ({reference.device}); "
                f"got {x.device}. Move it with .to({reference_name}.device)."
            )


def _check_integer(name: str, x: object, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {_describe(x)}.")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must have an integer dtype (torch.long); got dtype {x.dtype}. "
            f"Convert it with {name}.long()."
        )
    if x.device != device:
        raise ValueError(
            f"{name} must be on device {device} (where the potentials are); got {x.device}."
        )
    return x


def check_expand_shape(name: str, batch_shape: object, batch: int) -> int:
    """Return ``n`` for ``expand(batch_shape)`` of a family with one batch dimension ``[batch]``.

    As torch's ``expand``: ``[B]`` stays ``[B]`` and a batch of one becomes any ``[n]``.

    Raises:
        ValueError: more than one dimension, or a size other than ``batch`` from ``batch > 1``.
    """
    shape = torch.Size(batch_shape)  # type: ignore[arg-type]
    if len(shape) != 1 or (batch != 1 and shape[0] != batch):
        raise ValueError(
            f"{name}.expand: batch_shape must be ({batch},) or, from a batch of one, (n,); got "
            f"{tuple(shape)} for a batch of {batch}."
        )
    return shape[0]


def check_lengths(lengths: object, batch: int, length: int, device: torch.device) -> Tensor:
    """Check ``lengths``: integer tensor ``[B]`` with ``1 <= lengths[b] <= T``.

    Raises:
        TypeError: not an integer tensor.
        ValueError: wrong shape, value out of range, or wrong device.
    """
    if isinstance(lengths, Tensor) and lengths.dtype == torch.bool:
        raise TypeError(
            f"lengths must be an integer tensor [B]; got a bool tensor of shape "
            f"{tuple(lengths.shape)}, which looks like a mask: pass mask=... instead, or "
            "lengths=mask.sum(-1)."
        )
    x = _check_integer("lengths", lengths, device)
    if tuple(x.shape) != (batch,):
        raise ValueError(f"lengths must have shape [B] = ({batch},); got {tuple(x.shape)}.")
    bad = (x < 1) | (x > length)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"lengths must lie in [1, T] = [1, {length}]; got lengths[{b}] = {int(x[b])}."
        )
    return x


def check_index_tensor(
    name: str,
    x: object,
    shape: tuple[int, ...],
    high: int,
    device: torch.device,
    mask: Tensor | None = None,
) -> Tensor:
    """Check an index tensor: integer dtype, trailing shape ``shape``, values in ``[0, high)``.

    Args:
        name: argument name for messages.
        x: the tensor to check, shape ``[*S, *shape]``.
        shape: expected trailing shape.
        high: exclusive upper bound of valid values.
        device: expected device.
        mask: optional bool tensor broadcastable to ``x``; only entries where it is True are
            range-checked (padding may hold anything).

    Raises:
        TypeError: not an integer tensor.
        ValueError: wrong shape, device or value.
    """
    t = _check_integer(name, x, device)
    if tuple(t.shape[t.dim() - len(shape) :]) != shape or t.dim() < len(shape):
        raise ValueError(f"{name} must have trailing shape {shape}; got shape {tuple(t.shape)}.")
    bad = (t < 0) | (t >= high)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must lie in [0, {high - 1}]; got {int(t[index])} at {index}.")
    return t


def check_sample_shape(sample_shape: object) -> torch.Size:
    """Check ``sample_shape`` for ``sample``: a sequence of non-negative ints; return it.

    Raises:
        TypeError: not a sequence of ints.
        ValueError: a negative size.
    """
    items = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
    ints = isinstance(items, Sequence) and not isinstance(items, str)
    if not ints or not all(isinstance(n, int) and not isinstance(n, bool) for n in items):  # type: ignore[attr-defined]
        raise TypeError(
            "sample_shape must be a tuple of non-negative ints (e.g. (100,) or ()); got "
            f"{sample_shape!r}"
        )
    shape = torch.Size(items)  # type: ignore[arg-type]
    if any(n < 0 for n in shape):
        raise ValueError(
            f"sample_shape must have non-negative sizes (the number of samples); got {tuple(shape)}"
        )
    return shape


def lengths_from(
    lengths: Tensor | None, mask: Tensor | None, batch: int, length: int, device: torch.device
) -> Tensor | None:
    """Turn a prefix ``mask`` (bool ``[B, T]``) into lengths, or pass ``lengths`` through.

    Exactly one of the two may be given (``None`` for both means every sequence is full).

    Raises:
        ValueError: both given; a mask of the wrong shape, with holes, or with an empty row.
        TypeError: a mask that is not a bool tensor.
    """
    if mask is None:
        return lengths
    if lengths is not None:
        raise ValueError("give lengths or mask, not both (mask is turned into lengths).")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor [B, T]; got {got}. Use mask.bool().")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"mask must have shape [B, T] = ({batch}, {length}); got {tuple(mask.shape)}."
        )
    if mask.device != device:
        raise ValueError(
            f"mask must be on device {device} (where the potentials are); got {mask.device}."
        )
    counts = mask.sum(-1)
    prefix = torch.arange(length, device=device)[None, :] < counts[:, None]
    holes = (prefix != mask).any(-1)
    if bool(holes.any()):
        b = int(holes.nonzero()[0, 0])
        raise ValueError(
            f"mask must be a prefix mask (True then False along each row); row {b} has holes: "
            f"{mask[b].int().tolist()}. Sequences must be left-aligned."
        )
    return counts


def _autocast_on(device: torch.device) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


def promote_under_autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under ``torch.autocast``, cast floating tensors of mixed dtypes to their promoted type.

    Autocast hands out low-precision activations (bfloat16 emissions from a ``Linear``) while
    parameters stay float32 (transitions): torch's own ops promote there, so do we. Outside
    autocast a dtype mismatch stays an error (``check_same_dtype_device``): it is usually a bug.
    Casting is differentiable, so each tensor still gets its gradient in its own dtype.
    """
    floats = [t for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if len({t.dtype for t in floats}) < 2 or not _autocast_on(floats[0].device):
        return tensors
    dtype = floats[0].dtype
    for t in floats[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors
    )
