"""cosmolit: deep learning for galaxy surveys on CPU, CUDA GPU or Graphcore IPU.

Importing the package is cheap: torch, pytorch_lightning, pyro, galsim and poptorch are
imported only by the sub-modules that need them.
"""

__version__ = "0.1.0"

from cosmolit.errors import CosmolitError, UsageError  # noqa: E402

__all__ = ["__version__", "CosmolitError", "UsageError"]
