"""maxdrop: a PyTorch Lightning research framework for MaxDropout and its peers."""

from maxdrop.layers import (
    ADL,
    SCOPES,
    DualAttentionDropBlock,
    MaxDropout,
    MaxDropoutV2,
    ProbGuidedMaxout,
    TopDropBlock,
    TopKDropout,
    adl,
    dual_attention_drop_block,
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
    "ADL",
    "DualAttentionDropBlock",
    "SCOPES",
    "MaxDropout",
    "MaxDropoutV2",
    "TopDropBlock",
    "TopKDropout",
    "ProbGuidedMaxout",
    "__version__",
    "adl",
    "dual_attention_drop_block",
    "max_dropout",
    "max_dropout_mask",
    "max_dropout_v2",
    "max_dropout_v2_mask",
    "top_drop_block",
    "top_drop_block_mask",
    "top_k_dropout",
    "top_k_dropout_mask",
]
