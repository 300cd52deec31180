"""Exponential families."""

__all__: list[str] = []
