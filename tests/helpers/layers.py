"""Checks and inputs shared by the layer tests."""

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the floating dtypes every layer is checked in


def assert_module_and_function_reject(module_cls, function, kwargs: dict, message: str) -> None:
    """Both the nn.Module and its pure function raise ValueError matching ``message`` for ``kwargs``."""
    with pytest.raises(ValueError, match=message):
        module_cls(**kwargs)
    with pytest.raises(ValueError, match=message):
        function(torch.ones(1, 1, 2, 2), **kwargs)
