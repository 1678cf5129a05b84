"""CIFAR backbones with named dropout slots that a config fills with any layer.

=================  =======================================================  ==============================
backbone           what                                                     slots
=================  =======================================================  ==============================
``ResNet18``       CIFAR ResNet-18 (the paper's), ``width`` option          stage1-4, block (0-7), head
``ResNet34``       CIFAR ResNet-34                                          stage1-4, block (0-15), head
``ResNet``         any BasicBlock ResNet (``blocks`` per stage)             stage1-4, block, head
``WideResNet``     WRN-depth-k (WRN-28-10 is the paper's)                   block (0-B-1), stage1-3, head
``FastCNN``        small airbench-style CNN for CPU runs (the quickstart)   stage1-3, block (0-2), head
``WithSlots``      any classifier (torchvision, timm, yours), traced by fx  named in the config
=================  =======================================================  ==============================

Every backbone has ``dropout_slots()`` (full name -> layer of every filled slot position)
and ``slot_positions()`` (every position -> where it sits). ``maxdrop slots <class>``
prints them. ``find_dropout_slots(module)`` finds the slots of a LightningModule's backbone.
"""

from maxdrop.models.fast_cnn import FastBlock, FastCNN
from maxdrop.models.resnet import BasicBlock, ResNet, ResNet18, ResNet34
from maxdrop.models.slots import SlotFactory, SlottedBackbone, find_dropout_slots
from maxdrop.models.wide_resnet import WideBasicBlock, WideResNet
from maxdrop.models.with_slots import WithSlots

__all__ = [
    "BasicBlock",
    "FastBlock",
    "FastCNN",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "SlotFactory",
    "SlottedBackbone",
    "WideBasicBlock",
    "WideResNet",
    "WithSlots",
    "find_dropout_slots",
]
