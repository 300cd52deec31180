"""Differentiable layers: sparsemax, QP layer, structured attention (function + Module pairs)."""

__all__: list[str] = []
