"""structift: exact structured prediction on graphical models, with IFT gradients.

Re-exports are explicit; each subpackage documents its own API.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
