"""Regularizers: MaxDropout, MaxDropoutV2 and their functional forms."""

from maxdrop.layers.max_dropout import (
    SCOPES,
    MaxDropout,
    MaxDropoutV2,
    max_dropout,
    max_dropout_mask,
    max_dropout_v2,
    max_dropout_v2_mask,
)

__all__ = [
    "SCOPES",
    "MaxDropout",
    "MaxDropoutV2",
    "max_dropout",
    "max_dropout_mask",
    "max_dropout_v2",
    "max_dropout_v2_mask",
]
