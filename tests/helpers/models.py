"""The three backbones at test size (a few channels each), by name: for tests that run every backbone."""

from functools import partial

from maxdrop.models import FastCNN, ResNet18, WideResNet

BACKBONES = {
    "FastCNN": partial(FastCNN, widths=(4, 8, 16)),
    "ResNet18": partial(ResNet18, width=4),
    "WRN-10-1": partial(WideResNet, depth=10, widen_factor=1),
}
