"""WithSlots: layers at named positions of any classifier, equal to the same layers in a shipped backbone."""

import copy
import io

import pytest
import torch
import torchvision
from torch import nn

from maxdrop import MaxDropout, ProbGuidedMaxout, TopKDropout
from maxdrop.models import ResNet18, WithSlots
from maxdrop.models.positions import model_positions
from maxdrop.models.slots import find_dropout_slots
from maxdrop.module import ClassificationModule
from maxdrop.monitoring.drop_masks import DropMaskImages, _private_copy
from maxdrop.training.eval_protocol import set_active_in_eval

STAGES = ["stages.0", "stages.1", "stages.2", "stages.3"]


def test_wrapped_resnet18_equals_resnet18_with_the_same_layers_in_its_slots():
    torch.manual_seed(0)
    slotted = ResNet18(width=8, slots={f"stage{s}": MaxDropout(0.3) for s in range(1, 5)})
    torch.manual_seed(0)
    wrapped = WithSlots(ResNet18(width=8), {"stages": {"after": STAGES, "layer": MaxDropout(0.3)}}, num_classes=10)
    assert wrapped.traced and list(wrapped.dropout_slots()) == ["stages.0", "stages.1", "stages.2", "stages.3"]
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    outs = []
    for net in (slotted, wrapped):
        net.train()
        logits = net(x)
        nn.functional.cross_entropy(logits, y).backward()
        grads = {n.removeprefix("model."): p.grad for n, p in net.named_parameters()}
        dropped = [int(layer.last_dropped) for layer in net.dropout_slots().values()]
        outs.append((logits, grads, dropped))
    (l1, g1, d1), (l2, g2, d2) = outs
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert d1 == d2 and all(d > 0 for d in d1)


def test_positions_are_torchvision_node_names_and_a_twice_called_module_has_one_per_call():
    positions, traced = model_positions(torchvision.models.resnet18(num_classes=10), torch.zeros(2, 3, 32, 32))
    names = [p.name for p in positions]
    assert traced
    node_names = torchvision.models.feature_extraction.get_graph_node_names(torchvision.models.resnet18())[0]
    assert [n for n in names if n in set(node_names)] == node_names  # every node, same names, same order
    assert {"layer1.0.relu", "layer1.0.relu_1", "layer1.0.add", "layer1", "fc"} <= set(names)
    assert names.index("layer1.0.relu") < names.index("layer1.0.relu_1") < names.index("layer1")
    by_name = {p.name: p for p in positions}
    assert by_name["layer2"].shape == (2, 128, 4, 4) and by_name["layer1.0.relu_1"].calls == 2


def test_the_second_call_of_a_module_gets_its_own_layer():
    net = WithSlots(
        {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 10}},
        {"relu": {"after": "layer1.*.relu_1", "layer": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}}}},
    )
    slots = net.dropout_slots()
    assert list(slots) == ["relu.0", "relu.1"] and slots["relu.0"] is not slots["relu.1"]
    net(torch.randn(2, 3, 32, 32))
    assert all(int(layer.last_dropped) > 0 for layer in slots.values())


def test_a_pattern_that_matches_nothing_lists_close_matches():
    with pytest.raises(ValueError, match=r"'layer5' matches no position.*close matches: layer4"):
        WithSlots(torchvision.models.resnet18(), {"s": {"after": "layer5", "layer": MaxDropout()}})


class Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it) and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.act(self.conv(x))
        if x.sum() > 0:
            x = self.act(x - 0.1)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_modules_and_refuses_a_reused_one():
    with pytest.raises(ValueError, match=r"module 'act' runs 2 times per forward.*does not trace"):
        WithSlots(Untraceable(), {"s": {"after": "act", "layer": MaxDropout()}})
    net = WithSlots(Untraceable(), {"s": {"after": "conv", "layer": MaxDropout(0.3)}}, num_classes=10)
    assert not net.traced and list(net.dropout_slots()) == ["s"]
    net(torch.rand(2, 3, 8, 8))
    assert int(net.dropout_slots()["s"].last_dropped) > 0


def test_wrong_width_is_refused_with_both_numbers():
    with pytest.raises(ValueError, match=r"gives 1000 outputs .* num_classes=10"):
        WithSlots(lambda: torchvision.models.resnet18(), num_classes=10)  # a factory without num_classes
    with pytest.raises(ValueError, match=r"gives 100 outputs .* num_classes=10"):
        ClassificationModule(lambda: torchvision.models.resnet18(num_classes=100), num_classes=10)


def test_num_classes_goes_by_keyword():
    spec = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 1000}}
    assert WithSlots(spec, num_classes=10).model.fc.out_features == 10  # the data's replaces the entry's
    assert ClassificationModule(torchvision.models.resnet18, num_classes=7).backbone.fc.out_features == 7
    model = {"class_path": "torchvision.models.resnet18"}
    spec = {"class_path": "maxdrop.models.WithSlots", "init_args": {"model": model}}
    assert ClassificationModule(spec, num_classes=7).backbone.model.fc.out_features == 7


def test_head_slot_hands_targets_and_the_classifier_to_prob_guided_maxout():
    net = WithSlots(torchvision.models.resnet18(num_classes=10), {"head": {"layer": ProbGuidedMaxout()}})
    assert net.needs_targets and net.slot_positions() == {"head": "before fc"}
    logits = net(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 10) and int(net.dropout_slots()["head"].last_seen) == 4 * 512
    with pytest.raises(ValueError, match="only the `head` slot"):
        WithSlots(torchvision.models.resnet18(), {"s": {"after": "layer1", "layer": ProbGuidedMaxout()}})
    with pytest.raises(ValueError, match="has none that maxdrop can find"):
        WithSlots(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), {"head": {"layer": MaxDropout()}})


def test_copies_pickles_and_state_dicts_keep_their_own_layers():
    net = WithSlots(ResNet18(width=8), {"stages": {"after": STAGES, "layer": TopKDropout(0.2)}}, num_classes=10)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    x = torch.randn(2, 3, 32, 32)
    for other in (copy.deepcopy(net), torch.load(buf, weights_only=False), _private_copy(net)):
        assert not set(map(id, other.dropout_slots().values())) & set(map(id, net.dropout_slots().values()))
        torch.testing.assert_close(other.eval()(x), net.eval()(x), rtol=0, atol=0)
    twin = WithSlots(ResNet18(width=8), {"stages": {"after": STAGES, "layer": TopKDropout(0.2)}}, num_classes=10)
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin.eval()(x), net.eval()(x), rtol=0, atol=0)


def test_torch_compile_runs_the_rewritten_graph():
    net = WithSlots(ResNet18(width=8), {"stages": {"after": STAGES, "layer": MaxDropout(0.3)}}, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(net, backend="eager")(x), net(x))


def test_callbacks_find_the_layers_of_a_wrapped_model():
    net = WithSlots(ResNet18(width=8), {"stages": {"after": STAGES, "layer": MaxDropout(0.3)}}, num_classes=10)
    assert list(find_dropout_slots(net)) == STAGES
    assert set_active_in_eval(net) == 4
    maps, skipped = DropMaskImages._record(_private_copy(net), torch.rand(3, 3, 32, 32))
    assert set(maps) == set(STAGES) and not skipped
