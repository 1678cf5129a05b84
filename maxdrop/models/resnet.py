"""CIFAR ResNet-18/34 (3x3 stem, no max-pool, 32x32 input) with named dropout slots.

The layout is the one of the MaxDropout authors' code (kuangliu-style CIFAR ResNet): a
3x3 conv-BN-ReLU stem, four stages of BasicBlocks with widths ``w, 2w, 4w, 8w`` and
strides ``1, 2, 2, 2``, global average pooling and a linear classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from maxdrop.models.slots import SlotFactory, SlottedBackbone, positive_int

__all__ = ["BasicBlock", "ResNet", "ResNet18", "ResNet34"]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, ``slot``, conv3x3-BN, + shortcut, ReLU.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first conv (and of the 1x1 projection shortcut).
        slot: the layer between the two convs (``nn.Identity`` when empty).

    Shape:
        (N, c_in, H, W) -> (N, c_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slot: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.slot = slot if slot is not None else nn.Identity()
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(self.slot(out)))
        return (out + self.shortcut(x)).relu()


class ResNet(SlottedBackbone):
    """CIFAR ResNet with BasicBlocks and named dropout slots.

    Slots (fill them with ``slots={name: factory}``):

    - ``stage1`` ... ``stage4``: after each stage's last block, before the next stage
      (``stage4``: before global pooling). This is where the MaxDropout authors apply it.
    - ``block``: inside every BasicBlock, between conv1-BN-ReLU and conv2; positions
      ``block.0`` ... ``block.B-1`` (global block index, B = sum of ``blocks``).
    - ``head``: after global average pooling, on the (N, 8w) features, before the classifier.

    Args:
        num_classes: classifier outputs.
        blocks: BasicBlocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        width: channels of the stem and stage 1 (64 in the paper); stages use w, 2w, 4w, 8w.
        slots: slot name -> layer factory (see :class:`SlottedBackbone`).

    Shape:
        (N, 3, H, W) -> (N, num_classes) logits; H = W = 32 for CIFAR.
    """

    SLOTS = {
        "stage1": "after stage 1 (its last block's ReLU), before stage 2",
        "stage2": "after stage 2, before stage 3",
        "stage3": "after stage 3, before stage 4",
        "stage4": "after stage 4, before global average pooling",
        "block": "in every BasicBlock between conv1-BN-ReLU and conv2 (block.0 ... block.B-1)",
        "head": "after global average pooling, before the linear classifier",
    }
    BLOCK_WHERE = "stage {stage}, block {block}: between conv1-BN-ReLU and conv2"

    def __init__(
        self,
        num_classes: int = 10,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        slots: Mapping[str, SlotFactory | None] | None = None,
    ) -> None:
        super().__init__(slots)
        if len(blocks) != 4 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks must be 4 positive ints (blocks per stage), got {blocks!r}")
        self.num_classes = positive_int("num_classes", num_classes)
        width = positive_int("width", width)
        self.stem = nn.Sequential(_conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, c_in = [], width
        for s, n_blocks in enumerate(blocks):
            c_out = width * 2**s
            stage = [
                BasicBlock(c_in if b == 0 else c_out, c_out, 2 if (b == 0 and s > 0) else 1, self.make_slot("block"))
                for b in range(n_blocks)
            ]
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.add_stages(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_slot = self.make_slot("head")
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) images -> (N, num_classes) logits; ``targets`` (N,) reach only a head layer
        that needs them (see :meth:`SlottedBackbone.apply_head`)."""
        x = self.run_stages(self.stem(x))
        return self.apply_head(self.pool(x).flatten(1), targets)


class ResNet18(ResNet):
    """CIFAR ResNet-18: BasicBlocks (2, 2, 2, 2). Slots as in :class:`ResNet`:
    ``stage1`` ... ``stage4`` (after each stage), ``block`` (``block.0`` ... ``block.7``,
    between the convs of every block), ``head`` (before the classifier).

    Args:
        num_classes: classifier outputs.
        width: stem/stage-1 channels (64 = the paper's ResNet-18; smaller for CPU runs).
        slots: slot name -> layer factory.
    """

    def __init__(
        self, num_classes: int = 10, width: int = 64, slots: Mapping[str, SlotFactory | None] | None = None
    ) -> None:
        super().__init__(num_classes, (2, 2, 2, 2), width, slots)


class ResNet34(ResNet):
    """CIFAR ResNet-34: BasicBlocks (3, 4, 6, 3). Slots as in :class:`ResNet`:
    ``stage1`` ... ``stage4``, ``block`` (``block.0`` ... ``block.15``), ``head``.

    Args:
        num_classes: classifier outputs.
        width: stem/stage-1 channels (64 as in the paper's ResNets).
        slots: slot name -> layer factory.
    """

    def __init__(
        self, num_classes: int = 10, width: int = 64, slots: Mapping[str, SlotFactory | None] | None = None
    ) -> None:
        super().__init__(num_classes, (3, 4, 6, 3), width, slots)
