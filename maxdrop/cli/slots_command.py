"""``maxdrop slots``: a backbone's dropout slots, or every position of any model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser

from maxdrop.cli.errors import INPUT_ERRORS, PROG, UsageError, usage_error
from maxdrop.models.slots import SlottedBackbone
from maxdrop.utils.class_paths import import_class_path

__all__ = ["slots_main"]


def _import(path: str) -> Any:
    try:
        return import_class_path(path)
    except ImportError as err:
        raise UsageError(f"{err}; give a full path such as maxdrop.models.ResNet18") from err


def _option_values(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs -> {key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    it = iter(argv)
    for key in it:
        if not key.startswith("--"):
            raise UsageError(f"expected --NAME VALUE, got {key!r}")
        name, _, value = key[2:].partition("=")
        if not _:
            value = next(it, None)
            if value is None:
                raise UsageError(f"option {key} needs a value")
        out[name] = yaml.safe_load(value)
    return out


def _print_any_model(spec: dict[str, Any], input_size: Sequence[int]) -> None:
    """Every position of any model (a WithSlots spec marks the filled ones)."""
    from maxdrop.models.positions import format_positions, model_positions
    from maxdrop.models.with_slots import WithSlots, build_from_spec

    cls = _import(spec["class_path"])
    init = dict(spec.get("init_args") or {})
    filled: dict[str, str] = {}
    if cls is WithSlots:
        wrapped = WithSlots(**init)
        input_size = wrapped.input_size
        for name, where in wrapped.slot_positions().items():
            filled[where.partition(" ")[2]] = f"{name} ({where.partition(' ')[0]})"
        spec, init = init["model"], {}
        cls = None
    name = spec["class_path"] if isinstance(spec, dict) else type(spec).__name__
    try:
        model = build_from_spec(spec, "the model")
    except (ValueError, TypeError) as err:
        raise UsageError(
            f"cannot build {name} with the arguments given ({err}); give them as --NAME VALUE, e.g. "
            f"`{PROG} slots torchvision.models.resnet18 --num_classes 10`"
        ) from None  # the message says it all; the cause would replace it (see _root_cause)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{name} built a {type(model).__name__}, not an nn.Module: it has no positions to list")
    try:
        positions, traced = model_positions(model, torch.zeros(2, *input_size))
    except RuntimeError as err:
        raise UsageError(
            f"a dry forward of {name} on a batch of {'x'.join(map(str, input_size))} inputs fails ({err}); give "
            "the input size it takes as --input_size C H W"
        ) from err
    how = (
        "torch.fx graph nodes, named as torchvision's get_graph_node_names names them"
        if traced
        else "module boundaries (the model does not trace with torch.fx)"
    )
    print(
        f"{spec['class_path'] if isinstance(spec, dict) else type(model).__name__}: {len(positions)} positions "
        f"({how}); output shapes per image at input {'x'.join(map(str, input_size))}\n"
    )
    print(format_positions(positions, filled))


def slots_main(argv: Sequence[str]) -> None:
    """``maxdrop slots CLASS_OR_CONFIG [--init_arg VALUE ...]``: a backbone's slots, or any model's positions."""
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} slots BACKBONE_CLASS|MODEL_CLASS_PATH|CONFIG.yaml [--ARG VALUE ...]\n\n"
            "Lists the dropout slots of a maxdrop backbone (name: where it sits) and the full name of every\n"
            "slot position, built with its default arguments or the ones given; for any other model (a class or\n"
            "factory function, or the backbone of a config, e.g. a maxdrop.models.WithSlots) every position in\n"
            "forward order with its type, output shape (dry forward, --input_size, default 3 32 32) and calls, e.g.\n"
            f"  {PROG} slots maxdrop.models.ResNet18\n  {PROG} slots maxdrop.models.WideResNet --depth 16\n"
            f"  {PROG} slots torchvision.models.resnet18 --num_classes 10\n"
            f"  {PROG} slots configs/any/resnet18_torchvision_maxdropout.yaml"
        )
        return
    target, options = argv[0], _option_values(argv[1:])
    input_size = options.pop("input_size", (3, 32, 32))
    if target.endswith((".yaml", ".yml")):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"config file {target!r} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        spec = (config.get("model") or {}).get("init_args", {}).get("backbone")
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise UsageError(f"{target} has no model.init_args.backbone with a class_path")
        return _print_any_model(spec, input_size)
    cls = _import(target)
    from maxdrop.models.with_slots import WithSlots

    if not (isinstance(cls, type) and issubclass(cls, SlottedBackbone)) or cls is WithSlots:
        return _print_any_model({"class_path": target, "init_args": options}, input_size)
    parser = ArgumentParser(prog=f"{PROG} slots {target}", exit_on_error=False)
    parser.add_class_arguments(cls, skip={"slots"})
    try:
        cfg = parser.parse_args(list(argv[1:]))
    except Exception as err:  # noqa: BLE001 (jsonargparse's ArgumentError)
        raise UsageError(str(err)) from err
    init = {k: v for k, v in cfg.as_dict().items() if k != "__path__"}
    try:
        model = cls(**init)
    except INPUT_ERRORS as err:
        raise usage_error(err) from err
    args = ", ".join(f"{k}={v!r}" for k, v in init.items())
    print(f"{target}({args})\n\nslots (fill with `slots: {{<name>: {{class_path: ...}}}}`):")
    width = max(map(len, cls.SLOTS))
    for name, where in cls.SLOTS.items():
        print(f"  {name:<{width}}  {where}")
    print("\nslot positions in forward order (the names that dropout_slots() and SparsityMonitor use):")
    positions = model.slot_positions()
    width = max(map(len, positions))
    for name, where in positions.items():
        print(f"  {name:<{width}}  {where}")
