"""Regularizers: MaxDropout, MaxDropoutV2 and their peers, with their functional forms."""

from maxdrop.layers.adl import ADL, adl, adl_drop_mask, adl_importance_map, adl_uses_drop_mask
from maxdrop.layers.dgdm import DualAttentionDropBlock, cagd_channel_mask, dual_attention_drop_block, sagd_block_mask
from maxdrop.layers.max_dropout import (
    SCOPES,
    MaxDropout,
    MaxDropoutV2,
    max_dropout,
    max_dropout_mask,
    max_dropout_v2,
    max_dropout_v2_mask,
)
from maxdrop.layers.prob_guided_maxout import (
    ProbGuidedMaxout,
    prob_guided_keep_fraction,
    prob_guided_maxout,
    prob_guided_maxout_mask,
)
from maxdrop.layers.top_drop_block import TopDropBlock, top_drop_block, top_drop_block_mask
from maxdrop.layers.top_k_dropout import TopKDropout, top_k_dropout, top_k_dropout_mask

__all__ = [
    "ADL",
    "DualAttentionDropBlock",
    "SCOPES",
    "MaxDropout",
    "MaxDropoutV2",
    "TopDropBlock",
    "TopKDropout",
    "ProbGuidedMaxout",
    "adl",
    "adl_drop_mask",
    "adl_importance_map",
    "adl_uses_drop_mask",
    "cagd_channel_mask",
    "dual_attention_drop_block",
    "max_dropout",
    "max_dropout_mask",
    "max_dropout_v2",
    "max_dropout_v2_mask",
    "prob_guided_keep_fraction",
    "prob_guided_maxout",
    "prob_guided_maxout_mask",
    "sagd_block_mask",
    "top_drop_block",
    "top_drop_block_mask",
    "top_k_dropout",
    "top_k_dropout_mask",
]
