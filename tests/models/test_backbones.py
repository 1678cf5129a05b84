"""Backbones: slot placement against the authors' code, slot filling, shapes, parameter counts."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DropBlock2d

from maxdrop import MaxDropout, max_dropout
from maxdrop.models import FastCNN, ResNet18, ResNet34, WideResNet


class Tag(nn.Module):
    """A pass-through layer that counts as a filled slot (nn.Identity would count as empty)."""

    def forward(self, x):
        return x


def record_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, input shape) of every leaf module, in the order forward calls them."""
    calls, handles = [], []
    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: calls.append((n, tuple(i[0].shape)))))
    model(x)
    for h in handles:
        h.remove()
    return calls


def test_resnet18_stage_slots_sit_after_each_stage_before_pooling():
    model = ResNet18(slots={f"stage{s}": Tag for s in range(1, 5)})
    calls = record_order(model, torch.randn(2, 3, 32, 32))
    names = [n for n, _ in calls]
    for s in range(1, 5):
        i = names.index(f"stage_slots.stage{s}")
        # The slot runs right after the stage's last block (its ReLU is functional, so its last
        # leaf is bn2 or the shortcut) and before the next stage's first conv or the pooling.
        assert names[i - 1].startswith(f"stages.{s - 1}.1."), names[i - 1]
        assert names[i + 1] == (f"stages.{s}.0.conv1" if s < 4 else "pool")
    shapes = {n: shape for n, shape in calls if n.startswith("stage_slots")}
    assert shapes == {
        "stage_slots.stage1": (2, 64, 32, 32),
        "stage_slots.stage2": (2, 128, 16, 16),
        "stage_slots.stage3": (2, 256, 8, 8),
        "stage_slots.stage4": (2, 512, 4, 4),
    }


def test_resnet18_with_maxdropout_equals_the_authors_forward():
    """The authors' ResNet.forward: stem, then MaxDropout after layer1..layer4, avg_pool2d(4), linear."""
    torch.manual_seed(0)
    model = ResNet18(width=8, slots={f"stage{s}": partial(MaxDropout, 0.3) for s in range(1, 5)}).train()
    x = torch.randn(8, 3, 32, 32)
    out = model.stem(x)
    for stage in model.stages:
        out = max_dropout(stage(out), 0.3)  # MaxDropout(drop=0.3).forward(out) in their code
    reference = model.fc(F.avg_pool2d(out, 4).flatten(1))
    torch.testing.assert_close(model(x), reference)  # equal up to the pooling's summation order


def test_resnet_block_slot_sits_between_the_two_convs():
    model = ResNet18(width=8, slots={"block": Tag})
    names = [n for n, _ in record_order(model, torch.randn(2, 3, 32, 32))]
    for s in range(4):
        for b in range(2):
            i = names.index(f"stages.{s}.{b}.slot")
            assert names[i - 1] == f"stages.{s}.{b}.bn1" and names[i + 1] == f"stages.{s}.{b}.conv2"
    assert list(model.dropout_slots()) == [f"block.{i}" for i in range(8)]


def test_wrn_block_slot_equals_the_original_dropout_position():
    """xternalz WRN BasicBlock.forward with F.dropout replaced by MaxDropout, on our block's weights."""
    torch.manual_seed(0)
    model = WideResNet(depth=10, widen_factor=2, slots={"block": partial(MaxDropout, 0.3)}).train()

    def original_block(blk, x):
        equal_in_out = blk.shortcut is None
        if not equal_in_out:
            x = F.relu(blk.bn1(x))
            out = x
        else:
            out = F.relu(blk.bn1(x))
        out = F.relu(blk.bn2(blk.conv1(out)))
        out = max_dropout(out, 0.3)  # the original: F.dropout(out, p=self.droprate, training=self.training)
        out = blk.conv2(out)
        return (x if equal_in_out else blk.shortcut(x)) + out

    x = torch.randn(4, 3, 32, 32)
    out = model.stem(x)
    for group in model.stages:
        for blk in group:
            out = original_block(blk, out)
    reference = model.fc(F.avg_pool2d(F.relu(model.bn(out)), 8).flatten(1))
    torch.testing.assert_close(model(x), reference)  # equal up to the pooling's summation order
    names = [n for n, _ in record_order(WideResNet(depth=10, widen_factor=1, slots={"block": Tag}), x)]
    for g in range(3):
        i = names.index(f"stages.{g}.0.slot")
        assert names[i - 2 : i + 2] == [f"stages.{g}.0.conv1", f"stages.{g}.0.bn2", f"stages.{g}.0.slot",
                                        f"stages.{g}.0.conv2"]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "params"),
    [
        (lambda: ResNet18(), 11_173_962),  # the CIFAR ResNet-18 of the authors' (kuangliu's) code
        (lambda: ResNet34(), 21_282_122),
        (lambda: WideResNet(depth=28, widen_factor=10), 36_479_194),  # WRN-28-10 as in the WRN paper
    ],
)
def test_paper_backbones_have_the_published_parameter_counts(build, params):
    assert sum(p.numel() for p in build().parameters()) == params


def test_every_position_gets_its_own_instance_and_order_is_forward_order():
    model = WideResNet(depth=16, widen_factor=1, slots={"block": partial(nn.Dropout, 0.3), "head": nn.Dropout})
    slots = model.dropout_slots()
    assert list(slots) == [f"block.{i}" for i in range(6)] + ["head"]
    assert len({id(m) for m in slots.values()}) == 7
    assert all(isinstance(m, nn.Dropout) and m.p == 0.3 for n, m in slots.items() if n != "head")
    assert list(model.slot_positions()) == [
        "block.0", "block.1", "stage1", "block.2", "block.3", "stage2", "block.4", "block.5", "stage3", "head"
    ]  # fmt: skip


def test_a_module_instance_is_copied_to_every_position():
    layer = DropBlock2d(p=0.1, block_size=3)
    model = ResNet18(width=4, slots={"block": layer})
    slots = list(model.dropout_slots().values())
    assert len(slots) == 8 and all(isinstance(m, DropBlock2d) and m is not layer for m in slots)
    assert len({id(m) for m in slots}) == 8


def test_empty_slots_are_identity_and_not_listed():
    model = ResNet18(width=4, slots={"stage2": MaxDropout, "stage3": None})
    assert list(model.dropout_slots()) == ["stage2"]
    assert isinstance(model.stage_slots["stage3"], nn.Identity)
    assert isinstance(model.stages[0][0].slot, nn.Identity)
    assert ResNet18(width=4).dropout_slots() == {}


@pytest.mark.parametrize("cls", [ResNet18, WideResNet, FastCNN])
def test_unknown_slot_name_lists_the_valid_ones(cls):
    with pytest.raises(ValueError, match=r"no dropout slot 'stage9'; valid slots: ") as err:
        cls(slots={"stage9": MaxDropout})
    assert f"valid slots: {', '.join(cls.SLOTS)} (" in str(err.value)
    assert {"stage1", "block", "head"} <= set(cls.SLOTS)


def test_bad_slot_values_are_rejected():
    with pytest.raises(TypeError, match="slot 'stage1'.*layer factory"):
        ResNet18(slots={"stage1": 0.3})
    with pytest.raises(TypeError, match="slot 'stage1'.*not an nn.Module"):
        ResNet18(width=4, slots={"stage1": lambda: 0.3})
    with pytest.raises(TypeError, match="mapping"):
        ResNet18(slots=["stage1"])


def test_slots_change_training_only_and_no_parameters():
    """Dropout slots add no weights: the same state_dict loads, and eval outputs are identical."""
    torch.manual_seed(0)
    plain = FastCNN(widths=(8, 16, 16, 32)).eval()
    filled = FastCNN(widths=(8, 16, 16, 32), slots={"stage1": MaxDropout, "block": MaxDropout, "head": nn.Dropout})
    filled.load_state_dict(plain.state_dict())
    filled.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(filled(x), plain(x), rtol=0, atol=0)
    filled.train()
    assert not torch.equal(filled(x), plain.train()(x))


@pytest.mark.parametrize(
    ("model", "n_slots"),
    [
        (ResNet18(num_classes=100, width=4), 13),
        (ResNet34(num_classes=100, width=4), 21),
        (WideResNet(num_classes=100, depth=10, widen_factor=1), 7),
        (FastCNN(num_classes=100, widths=(8, 16, 16, 32)), 7),
        (FastCNN(num_classes=100, widths=(8, 16)), 3),
    ],
)
def test_shapes_and_gradients(model, n_slots):
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 100)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(model.slot_positions()) == n_slots


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4.*got 27"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        ResNet18(num_classes=0)
    with pytest.raises(ValueError, match="width must be a positive int, got -1"):
        ResNet18(width=-1)
    with pytest.raises(ValueError, match="widths must list 2 to 4"):
        FastCNN(widths=(8,))
    with pytest.raises(ValueError, match="2 stages has no slot 'stage3'"):
        FastCNN(widths=(8, 16, 32), slots={"stage3": MaxDropout})
