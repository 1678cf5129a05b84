"""Checks that a checkpoint can continue in the model and run at hand, made before any training step,
so that a mismatch ends with a message that says what to do instead of a failure mid-epoch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_schedule_length", "check_state_dict_keys"]


def _describe(backbone: Any) -> str:
    """A backbone entry of the hyperparameters (a class_path/init_args mapping, or a class) in words."""
    if isinstance(backbone, Mapping):
        slots = backbone.get("init_args", {}).get("slots") or {}
        filled = {k: v.get("class_path", v) if isinstance(v, Mapping) else v for k, v in slots.items()}
        return f"{backbone.get('class_path', '?')} with slots {filled or '{}'}"
    backbone = getattr(backbone, "func", backbone)  # a functools.partial of a class
    return getattr(backbone, "__name__", type(backbone).__name__)


def check_state_dict_keys(checkpoint: Mapping[str, Any], own: Mapping[str, Any], own_backbone: Any) -> None:
    """Raises ValueError naming the first keys that are in only one of the checkpoint and the model.

    Args:
        checkpoint: a Lightning checkpoint (``state_dict``, ``hyper_parameters``).
        own: the model's ``state_dict()``.
        own_backbone: the model's ``backbone`` hyperparameter (named in the message with its slots).
    """
    saved = checkpoint.get("state_dict", {})
    only_saved = [k for k in saved if k not in own]
    only_own = [k for k in own if k not in saved]
    if not only_saved and not only_own:
        return
    parts = []
    if only_saved:
        parts.append(f"{len(only_saved)} key(s) only in the checkpoint, first {', '.join(only_saved[:3])}")
    if only_own:
        parts.append(f"{len(only_own)} key(s) only in this model, first {', '.join(only_own[:3])}")
    raise ValueError(
        f"the checkpoint does not fit this model ({'; '.join(parts)}): it was trained with the backbone "
        f"{_describe(checkpoint.get('hyper_parameters', {}).get('backbone'))} and this model has "
        f"{_describe(own_backbone)}; load it into a model built with the same backbone "
        "and slots (the run's config.yaml has them)"
    )


def check_schedule_length(saved_schedulers: list[Mapping[str, Any]] | None, new_total: int, trainer: Any) -> None:
    """Refuses to resume a schedule whose length (``total_steps``) was fixed by the first run.

    Args:
        saved_schedulers: the checkpoint's ``lr_schedulers`` states (None when not resuming).
        new_total: the ``total_steps`` this run would give the schedule.
        trainer: the resuming trainer (for ``max_epochs``, ``max_steps`` and the checkpoint path).

    Raises:
        ValueError: the checkpoint's schedule was built for another number of steps.
    """
    if not saved_schedulers:
        return
    saved = saved_schedulers[0].get("total_steps")
    if saved is None or int(saved) == new_total:
        return
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_steps is not None and max_steps > 0:
        length, same = f"max_steps={max_steps}", f"--trainer.max_steps {saved}"
    else:
        per_epoch = new_total / max_epochs if max_epochs else 0
        old_epochs = saved / per_epoch if per_epoch else None
        length = f"max_epochs={max_epochs}, {per_epoch:g} steps per epoch"
        same = (
            f"--trainer.max_epochs {int(old_epochs)}"
            if old_epochs and float(old_epochs).is_integer()
            else "the first run's max_epochs and batches per epoch"
        )
    raise ValueError(
        f"cannot resume from {trainer.ckpt_path}: its learning-rate schedule was built for {int(saved)} optimizer "
        f"steps (total_steps, fixed by the first run's length) and this run would take {new_total} ({length}); "
        "a schedule such as OneCycleLR cannot be stretched once started. Resume with the same length "
        f"({same}), or start a new run from the checkpoint's weights (without --ckpt_path, e.g. "
        "ClassificationModule.load_from_checkpoint(path) in Python) with a schedule of its own"
    )
