"""Import the object that a dotted ``class_path`` (``package.module.Name``) names, as configs give them."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_class_path"]


def import_class_path(path: str) -> Any:
    """The object named by ``path``, e.g. ``"maxdrop.models.ResNet18"`` -> the class.

    Raises:
        ImportError: ``path`` is not a dotted name, its module cannot be imported, or the module has no such
            attribute; the message names ``path`` and the reason.
    """
    module_name, _, name = str(path).rpartition(".")
    if not module_name or not name:
        raise ImportError(f"cannot import {path!r}: not a dotted path such as maxdrop.models.ResNet18")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ImportError(f"cannot import {path!r} ({err})") from err
