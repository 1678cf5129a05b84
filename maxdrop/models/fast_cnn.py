"""A small, fast CNN with dropout slots for CPU runs (the quickstart model).

Airbench-style (Keller Jordan's CIFAR-10 speedruns): BatchNorm everywhere, few channels,
max-pooling to downsample, a global max-pool and a bias-free, scaled linear head. Trained
with a high learning rate, label smoothing and a one-cycle schedule it reaches usable
CIFAR-10 accuracy within a few epochs on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from maxdrop.models.slots import SlotFactory, SlottedBackbone, positive_int

__all__ = ["FastBlock", "FastCNN"]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FastBlock(nn.Module):
    """2x2 max-pool, conv3x3-BN-ReLU, ``slot``, conv3x3-BN-ReLU.

    Pooling first runs both convs at the lower resolution, which is what makes the net cheap.

    Shape:
        (N, c_in, H, W) -> (N, c_out, H / 2, W / 2).
    """

    def __init__(self, c_in: int, c_out: int, slot: nn.Module | None = None) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Sequential(*_conv_bn_relu(c_in, c_out))
        self.slot = slot if slot is not None else nn.Identity()
        self.conv2 = nn.Sequential(*_conv_bn_relu(c_out, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.slot(self.conv1(self.pool(x))))


class FastCNN(SlottedBackbone):
    """Small CNN for quick CPU runs: a conv stem and one :class:`FastBlock` per stage.

    Slots:

    - ``stage1`` ... ``stageS``: after each stage (S = ``len(widths) - 1``, 3 by default).
    - ``block``: inside each stage's block between its two convs (``block.0`` ... ``block.S-1``).
    - ``head``: after global max-pooling, before the linear classifier.

    Args:
        num_classes: classifier outputs.
        widths: channels of the stem, then of each stage (each stage halves the resolution).
        scale: the logits are multiplied by this (a bias-free head with a fixed scale, as in airbench).
        slots: slot name -> layer factory (see :class:`SlottedBackbone`).

    Shape:
        (N, 3, H, W) -> (N, num_classes) logits; H = W = 32 for CIFAR.
    """

    SLOTS = {
        "stage1": "after stage 1, before stage 2",
        "stage2": "after stage 2, before stage 3",
        "stage3": "after stage 3 (the last one by default), before global max-pooling",
        "block": "in each stage's block between its two conv-BN-ReLUs (block.0 ... block.S-1)",
        "head": "after global max-pooling, before the linear classifier",
    }
    BLOCK_WHERE = "stage {stage}: between the two conv-BN-ReLUs"

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64, 128),
        scale: float = 0.125,
        slots: Mapping[str, SlotFactory | None] | None = None,
    ) -> None:
        if not 2 <= len(widths) <= 4:
            raise ValueError(f"widths must list 2 to 4 channel counts (stem, then 1 to 3 stages), got {widths!r}")
        n_stages = len(widths) - 1
        unused = [f"stage{s}" for s in range(n_stages + 1, 4) if slots and f"stage{s}" in slots]
        if unused:
            raise ValueError(f"FastCNN with {n_stages} stages has no slot {', '.join(map(repr, unused))}")
        super().__init__(slots)
        self.num_classes = positive_int("num_classes", num_classes)
        widths = [positive_int("widths[i]", w) for w in widths]
        self.scale = float(scale)
        self.stem = nn.Sequential(*_conv_bn_relu(3, widths[0]))
        self.add_stages(
            nn.Sequential(FastBlock(c_in, c_out, self.make_slot("block")))
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head_slot = self.make_slot("head")
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)

    def classify(self, features: Tensor) -> Tensor:
        """(N, widths[-1]) pooled features -> (N, num_classes) logits: the linear head times ``scale``."""
        return self.fc(features) * self.scale

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) images -> (N, num_classes) logits; ``targets`` (N,) reach only a head layer
        that needs them (see :meth:`SlottedBackbone.apply_head`)."""
        x = self.run_stages(self.stem(x))
        return self.apply_head(self.pool(x).flatten(1), targets)
