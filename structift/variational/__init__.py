"""structift.variational."""

__all__: list[str] = []
