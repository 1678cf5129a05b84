"""Wide ResNet (Zagoruyko & Komodakis, 2016) for CIFAR with named dropout slots.

Follows the PyTorch WRN that the MaxDropout authors used (xternalz/WideResNet-pytorch):
pre-activation blocks, a 3x3 conv stem with 16 channels, three groups of widths
``16k, 32k, 64k`` with strides ``1, 2, 2``, a final BN-ReLU, global average pooling and a
linear classifier, with the same weight initialization. The original block applies
``F.dropout`` between its two convs; here that position is the ``block`` slot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor, nn

from maxdrop.models.slots import SlotFactory, SlottedBackbone, positive_int

__all__ = ["WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU, conv3x3, BN-ReLU, ``slot``, conv3x3, + shortcut.

    As in the original code, when the block changes the width, the 1x1 projection
    shortcut takes the pre-activated input (BN-ReLU(x)) rather than x.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first conv and of the projection.
        slot: layer between the two convs (where the original WRN has its dropout).

    Shape:
        (N, c_in, H, W) -> (N, c_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slot: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.slot = slot if slot is not None else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = c_in == c_out and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x).relu()
        out = self.conv2(self.slot(self.bn2(self.conv1(pre)).relu()))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(SlottedBackbone):
    """WRN-depth-k for 32x32 inputs with named dropout slots.

    Slots:

    - ``block``: in every block between the two convs, after BN-ReLU, where the original
      WRN applies dropout; positions ``block.0`` ... ``block.B-1`` with B = 3 (depth - 4) / 6
      (12 for WRN-28-10). The paper's +Dropout and +MaxDropout WRN rows fill this slot.
    - ``stage1`` ... ``stage3``: on the output of each group (``stage3``: before the final BN-ReLU).
    - ``head``: after global average pooling, before the classifier.

    Args:
        num_classes: classifier outputs.
        depth: 6n + 4 (28 in the paper).
        widen_factor: k (10 in the paper).
        slots: slot name -> layer factory (see :class:`SlottedBackbone`).

    Shape:
        (N, 3, H, W) -> (N, num_classes) logits; H = W = 32 for CIFAR.
    """

    SLOTS = {
        "block": "in every block between the two convs, after BN-ReLU (block.0 ... block.B-1): the WRN dropout",
        "stage1": "output of group 1, before group 2",
        "stage2": "output of group 2, before group 3",
        "stage3": "output of group 3, before the final BN-ReLU and global average pooling",
        "head": "after global average pooling, before the linear classifier",
    }
    BLOCK_WHERE = "group {stage}, block {block}: between the two convs"

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 28,
        widen_factor: int = 10,
        slots: Mapping[str, SlotFactory | None] | None = None,
    ) -> None:
        super().__init__(slots)
        self.num_classes = positive_int("num_classes", num_classes)
        widen_factor = positive_int("widen_factor", widen_factor)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.add_stages(  # the WRN's three groups
            nn.Sequential(
                *(
                    WideBasicBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1], stride if b == 0 else 1,
                                   self.make_slot("block"))
                    for b in range(n)
                )
            )
            for g, stride in enumerate((1, 2, 2))
        )  # fmt: skip
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_slot = self.make_slot("head")
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the original WRN initialization
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) images -> (N, num_classes) logits; ``targets`` (N,) reach only a head layer
        that needs them (see :meth:`SlottedBackbone.apply_head`)."""
        x = self.run_stages(self.stem(x))
        return self.apply_head(self.pool(self.bn(x).relu()).flatten(1), targets)
