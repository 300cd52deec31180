"""structift.implicit."""

__all__: list[str] = []
