"""structift.datasets."""

__all__: list[str] = []
