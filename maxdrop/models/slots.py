"""Named dropout slots that a config fills with any layer.

A backbone declares its slots in :attr:`SlottedBackbone.SLOTS` (slot name -> where it
sits) and takes ``slots={name: factory}``. A factory is anything that builds a fresh
``nn.Module`` when called with no argument: a class (``maxdrop.MaxDropout``), a
``functools.partial``, a lambda, or what jsonargparse builds from a YAML
``class_path``/``init_args`` entry. A slot can occur at many positions (``block`` is in
every residual block): each position calls the factory once, so no two positions share
a layer instance. Unfilled slots hold ``nn.Identity``.

A layer that declares ``needs_targets = True`` (:class:`maxdrop.layers.ProbGuidedMaxout`) may
fill only the ``head`` slot: :meth:`SlottedBackbone.apply_head` calls it as
``layer(features, targets, self.classify)`` when the backbone's forward got ``targets``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import ClassVar

from torch import Tensor, nn

__all__ = ["SlotFactory", "SlottedBackbone", "find_dropout_slots", "positive_int"]

#: What a slot is filled with: a zero-argument callable that returns a new layer.
SlotFactory = Callable[[], nn.Module]


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int >= 1, else a ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_slot_layer(layer: object, spec: object, slot: str, owner: str) -> nn.Module:
    """``layer`` (built from ``spec`` for ``slot`` of the backbone class ``owner``) if it can fill that slot:
    an nn.Module, and one that needs the targets only in the ``head`` slot (the only one that hands them over)."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"slot {slot!r}: {spec!r} built a {type(layer).__name__}, not an nn.Module")
    if getattr(layer, "needs_targets", False) and slot != "head":
        raise ValueError(
            f"slot {slot!r} of {owner}: {type(layer).__name__} needs the targets and the "
            "classifier, which only the `head` slot hands over; put it in `head`"
        )
    return layer


class SlottedBackbone(nn.Module):
    """Base class of the backbones with named dropout slots.

    Subclasses set :attr:`SLOTS`, call ``super().__init__(slots)`` first, build each
    slot layer with :meth:`make_slot` and either follow the staged layout that
    :meth:`_slot_sites` reads (:meth:`add_stages`, :meth:`run_stages`, ``self.head_slot``,
    :meth:`apply_head`) or override it.

    Args:
        slots: slot name -> factory (or ``None`` for an empty slot). An ``nn.Module``
            instance is accepted too: each position then gets a deep copy of it.

    Raises:
        ValueError: a slot name that the backbone does not have; the message lists the valid ones.
        TypeError: ``slots`` is not a mapping, or a value is neither a module nor callable.
    """

    #: slot name -> where the slot sits (shown by ``maxdrop slots`` and in the docs).
    SLOTS: ClassVar[dict[str, str]] = {}
    #: where block position ``block.<i>`` sits, formatted with ``stage`` and ``block`` (1-based).
    BLOCK_WHERE: ClassVar[str] = "stage {stage}, block {block}"

    def __init__(self, slots: Mapping[str, SlotFactory | nn.Module | None] | None = None) -> None:
        super().__init__()
        self._slot_specs = self._check_slots(slots)

    @classmethod
    def _check_slots(cls, slots: object) -> dict[str, SlotFactory | nn.Module]:
        if slots is None:
            return {}
        if not isinstance(slots, Mapping):
            raise TypeError(f"slots must be a mapping of slot name -> layer factory, got {type(slots).__name__}")
        unknown = [name for name in slots if name not in cls.SLOTS]
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no dropout slot {', '.join(map(repr, unknown))}; valid slots: "
                f"{', '.join(cls.SLOTS)} (`maxdrop slots {cls.__module__}.{cls.__name__}` says where each sits)"
            )
        for name, spec in slots.items():
            if spec is not None and not isinstance(spec, nn.Module) and not callable(spec):
                raise TypeError(
                    f"slot {name!r} of {cls.__name__} must be filled with a layer factory (a class, partial or "
                    f"class_path/init_args entry) or an nn.Module, got {spec!r}"
                )
        return {name: spec for name, spec in slots.items() if spec is not None}

    def make_slot(self, name: str) -> nn.Module:
        """A new layer for one position of slot ``name`` (``nn.Identity`` when the slot is empty)."""
        spec = self._slot_specs.get(name)
        if spec is None:
            return nn.Identity()
        layer = copy.deepcopy(spec) if isinstance(spec, nn.Module) else spec()
        return check_slot_layer(layer, spec, name, type(self).__name__)

    @property
    def needs_targets(self) -> bool:
        """Whether the forward wants ``targets`` in training: the ``head`` layer declares ``needs_targets``."""
        return bool(getattr(getattr(self, "head_slot", None), "needs_targets", False))

    def classify(self, features: Tensor) -> Tensor:
        """The classifier: (N, D) pooled features -> (N, num_classes) logits (``self.fc`` by default)."""
        return self.fc(features)

    def apply_head(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """The ``head`` slot, then :meth:`classify`: (N, D) features -> (N, num_classes) logits.

        ``targets`` ((N,) class indices) reach only a head layer that declares ``needs_targets``,
        together with :meth:`classify` itself, so the layer scores the samples with the very
        parameters that are trained (and that DDP synchronizes); other layers get ``features`` alone.
        """
        if targets is not None and self.needs_targets:
            return self.classify(self.head_slot(features, targets, self.classify))
        return self.classify(self.head_slot(features))

    def add_stages(self, stages: Iterable[nn.Module]) -> None:
        """Register the stages of the staged layout (``self.stages``) and one slot after each
        (``self.stage_slots``: ``stage1`` ... ``stageS``); the stages' blocks hold their own ``slot``."""
        self.stages = nn.ModuleList(stages)
        self.stage_slots = nn.ModuleDict(
            {f"stage{s + 1}": self.make_slot(f"stage{s + 1}") for s in range(len(self.stages))}
        )

    def run_stages(self, x: Tensor) -> Tensor:
        """Each stage, then the slot after it: (N, C, H, W) stem output -> the last stage's output."""
        for stage, slot in zip(self.stages, self.stage_slots.values(), strict=True):
            x = slot(stage(x))
        return x

    def _slot_sites(self) -> Iterator[tuple[str, str, nn.Module]]:
        """Every slot position in forward order: (full name, where it sits, layer).

        This default covers the staged layout of the maxdrop backbones: ``self.stages``
        (sequences of blocks, each with a ``slot`` attribute), ``self.stage_slots`` (one
        layer after each stage, keyed ``stage1``, ...) and ``self.head_slot``; the text of
        a block position is ``self.BLOCK_WHERE`` formatted with ``stage`` and ``block``
        (1-based). Backbones of another layout override this method.
        """
        i = 0
        for s, (name, stage_slot) in enumerate(self.stage_slots.items()):
            for b, block in enumerate(self.stages[s]):
                yield f"block.{i}", self.BLOCK_WHERE.format(stage=s + 1, block=b + 1), block.slot
                i += 1
            yield name, self.SLOTS[name], stage_slot
        yield "head", self.SLOTS["head"], self.head_slot

    def slot_positions(self) -> dict[str, str]:
        """Full name of every slot position (filled or not) -> where it sits, in forward order."""
        return {name: where for name, where, _ in self._slot_sites()}

    def dropout_slots(self) -> dict[str, nn.Module]:
        """Full name -> layer of every *filled* slot position, in forward order.

        Full names are the slot name for single-position slots (``stage1``, ``head``) and
        ``<slot>.<i>`` for slots repeated in every block (``block.0`` ... ``block.B-1``).
        """
        return {name: layer for name, _, layer in self._slot_sites() if not isinstance(layer, nn.Identity)}


def find_dropout_slots(module: nn.Module) -> dict[str, nn.Module] | None:
    """The dropout slots of a LightningModule's backbone.

    Looks for ``module.backbone.dropout_slots()`` first, then for a ``dropout_slots`` method on any
    submodule (the outermost ones; slot names get the submodule's path as a prefix when there are
    several).

    Args:
        module: usually the LightningModule.

    Returns:
        ``{slot name: layer}`` (empty when the backbone has no filled slot), or None when no module
        has a ``dropout_slots`` method.

    Raises:
        TypeError: ``dropout_slots()`` returned something other than a ``{str: nn.Module}`` mapping.
        ValueError: one layer instance fills two slots (its counts would be taken twice).
    """
    backbone = getattr(module, "backbone", None)
    if isinstance(backbone, nn.Module) and callable(getattr(backbone, "dropout_slots", None)):
        owners = [("", backbone)]
    else:
        owners = []
        for path, sub in module.named_modules():
            if callable(getattr(sub, "dropout_slots", None)) and not any(
                path.startswith(p + ".") or p == "" for p, _ in owners
            ):
                owners.append((path, sub))
        if not owners:
            return None
    slots: dict[str, nn.Module] = {}
    for path, owner in owners:
        found = owner.dropout_slots()
        if not isinstance(found, Mapping):
            raise TypeError(
                f"{type(owner).__name__}.dropout_slots() must return a dict {{slot name: nn.Module}}, "
                f"got {type(found).__name__}"
            )
        for name, layer in found.items():
            if not isinstance(name, str) or not isinstance(layer, nn.Module):
                raise TypeError(
                    f"{type(owner).__name__}.dropout_slots() must map str to nn.Module, "
                    f"got {name!r}: {type(layer).__name__}"
                )
            slots[f"{path}.{name}" if len(owners) > 1 else name] = layer
    by_id: dict[int, str] = {}
    for name, layer in slots.items():
        if id(layer) in by_id:
            raise ValueError(
                f"slots {by_id[id(layer)]!r} and {name!r} hold the same {type(layer).__name__} instance; "
                "every slot needs its own layer instance"
            )
        by_id[id(layer)] = name
    return slots
