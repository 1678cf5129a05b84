"""maxdrop: a PyTorch Lightning research framework for MaxDropout and its peers."""

from maxdrop.layers import (
    SCOPES,
    MaxDropout,
    MaxDropoutV2,
    ProbGuidedMaxout,
    TopDropBlock,
    TopKDropout,
    max_dropout,
    max_dropout_mask,
    max_dropout_v2,
    max_dropout_v2_mask,
    top_drop_block,
    top_drop_block_mask,
    top_k_dropout,
    top_k_dropout_mask,
)

__version__ = "0.1.0"

__all__ = [
    "SCOPES",
    "MaxDropout",
    "MaxDropoutV2",
    "TopDropBlock",
    "TopKDropout",
    "ProbGuidedMaxout",
    "__version__",
    "max_dropout",
    "max_dropout_mask",
    "max_dropout_v2",
    "max_dropout_v2_mask",
    "top_drop_block",
    "top_drop_block_mask",
    "top_k_dropout",
    "top_k_dropout_mask",
]
