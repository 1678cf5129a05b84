"""maxdrop: a PyTorch Lightning research framework for MaxDropout and its peers.

The layers and their functional forms are exported at the top level (``maxdrop.MaxDropout``, ...);
the list is :mod:`maxdrop.layers`' own.
"""

from maxdrop import layers as _layers
from maxdrop.layers import *  # noqa: F403  (the layers, as maxdrop.MaxDropout, ...)

__version__ = "0.1.0"

__all__ = [*_layers.__all__, "__version__"]
