"""Dropout slots in any classifier: :class:`WithSlots` inserts layers at named positions of a model.

Positions are named as :mod:`torchvision.models.feature_extraction` names graph nodes
(``get_graph_node_names``): the model is traced with torch.fx (torchvision's ``NodePathTracer``, with
timm's leaf modules and untraceable functions when timm is installed), so functional ops (``F.relu``,
``x + y``) and a module called twice per forward (torchvision's ``BasicBlock.relu`` ->
``layer1.0.relu`` and ``layer1.0.relu_1``) are distinct positions; the layers go in as ``call_module``
nodes of the rewritten graph. Why fx and not hooks: hooks see only module boundaries, so they can
name neither a functional op nor the second call of a module.

A model that does not trace (data-dependent control flow), or whose train- and eval-mode graphs
differ (a branch on ``self.training``), falls back to module boundaries: each named module becomes
a position, and a filled one is replaced by a wrapper that runs ``before`` -> module -> ``after``. A
module that runs more than once per forward is refused there (the layer would run at every call).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from maxdrop.models.positions import (
    TracedModel,
    expand_patterns,
    find_classifier,
    module_calls,
    position_list,
    trace_model,
)
from maxdrop.models.slots import SlottedBackbone, check_slot_layer

__all__ = ["WithSlots", "build_from_spec", "check_output_width"]

#: The container of the inserted layers inside the rewritten model (``model.maxdrop_slots.<slot>.<i>``).
SLOTS_ATTR = "maxdrop_slots"


def _import(class_path: str, what: str) -> Any:
    module_name, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}: cannot import class_path {class_path!r} ({err})") from err


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword ``name`` (or ``**kwargs``, as timm.create_model does)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_from_spec(spec: Any, what: str, **overrides: Any) -> Any:
    """Build an object from a ``{"class_path", "init_args"}`` entry, a class/function or an instance.

    ``overrides`` (e.g. ``num_classes``) replace the entry's values where the callable accepts them by
    keyword (LightningCLI fills every default into the entry, so an absent value cannot be told from a
    default one). Instances (``nn.Module``) are returned as they are.
    """
    if isinstance(spec, nn.Module):
        return spec
    if callable(getattr(spec, "as_dict", None)):  # a jsonargparse Namespace
        spec = spec.as_dict()
    init: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        if "class_path" not in spec:
            raise ValueError(f"{what} must be a class_path/init_args entry, a callable or an nn.Module, got {spec!r}")
        fn, init = _import(spec["class_path"], what), dict(spec.get("init_args") or {})
    elif isinstance(spec, str):
        fn = _import(spec, what)
    elif callable(spec):
        fn = spec
    else:
        raise TypeError(f"{what} must be a class_path/init_args entry, a callable or an nn.Module, got {spec!r}")
    for key, value in overrides.items():
        if value is not None and _accepts(fn, key):
            init[key] = value
    return fn(**init)


class _Around(nn.Module):
    """Module-boundary fallback: ``before`` -> the wrapped module -> ``after``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.before: nn.Module = nn.Identity()
        self.after: nn.Module = nn.Identity()

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.after(self.module(self.before(x), *args, **kwargs))


def check_output_width(model: nn.Module, num_classes: int, example: Tensor, what: str, strict: bool = True) -> None:
    """ValueError naming both numbers when ``model(example)`` has another width than ``num_classes``
    (a dry forward in eval mode, which changes no state). ``strict=False``: a forward that fails
    (a model for another input size) is no error here."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception:
        if strict:
            raise
        return
    finally:
        model.train(was_training)
    width = out.shape[-1] if isinstance(out, Tensor) and out.ndim == 2 else None
    if width != num_classes:
        got = f"{width} outputs" if width is not None else f"output {getattr(out, 'shape', type(out).__name__)}"
        raise ValueError(
            f"{what} gives {got} per image but the data has num_classes={num_classes}: build it with "
            f"num_classes={num_classes} (its init_args), or give a model whose classifier has {num_classes} outputs"
        )


class WithSlots(SlottedBackbone):
    """Any ``nn.Module`` classifier with maxdrop layers at named positions of its forward.

    Example (YAML under ``model.init_args.backbone``)::

        class_path: maxdrop.models.WithSlots
        init_args:
          model: {class_path: torchvision.models.resnet18}
          slots:
            stages:
              after: [layer1, layer2, layer3, layer4]
              layer: {class_path: maxdrop.MaxDropout, init_args: {p: 0.3}}

    Args:
        model: the classifier: a ``class_path``/``init_args`` entry of a class or of a factory function
            (``torchvision.models.resnet18``, ``timm.create_model`` with ``model_name``,
            ``torchvision.models.get_model`` with ``name``), or in Python an ``nn.Module`` (used as it is,
            not copied) or a callable that builds one. ``num_classes`` (the data's, which the training
            module passes) is given to it by keyword, replacing the entry's, where the callable accepts it.
        slots: slot name -> ``{after: positions, before: positions, layer: spec}``. Positions are node
            names as ``maxdrop slots`` lists them (torchvision's ``get_graph_node_names``), or glob
            patterns over them (``blocks.*.mlp.act``); ``after`` applies the layer to that node's output
            (for every user of it), ``before`` to the first input of that node only. ``layer`` is a
            ``class_path`` entry, a class/factory, or an ``nn.Module`` template; every position gets its
            own instance (a deep copy of a template). The slot named ``head`` without positions goes
            before the classifier; a layer that ``needs_targets`` (ProbGuidedMaxout) may fill only it.
        head: module path of the classifier (default: timm's ``get_classifier()``, else ``fc``,
            ``classifier`` or ``head``).
        num_classes: classifier outputs; the model's output width is checked against it by a dry
            forward at ``input_size`` (the training module passes it).
        input_size: (C, H, W) of one input, for the dry forwards (CIFAR: 3x32x32).

    Slot positions (``dropout_slots()``, SparsityMonitor tags): the slot name when it has one position,
    ``<slot>.<i>`` (forward order) when it has several, as ``block.0`` in the shipped backbones.

    Raises:
        ValueError: a pattern that matches no position (the message lists close matches), a position
            taken twice, a module that runs more than once per forward (module-boundary fallback only),
            a ``head`` slot without a classifier, a wrong output width, a bad slot entry.
    """

    SLOTS: dict[str, str] = {}

    def __init__(
        self,
        model: dict[str, Any],
        slots: dict[str, dict[str, Any]] | None = None,
        head: str | None = None,
        num_classes: int | None = None,
        input_size: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__(None)
        net = build_from_spec(model, "WithSlots model", num_classes=num_classes)
        if not isinstance(net, nn.Module):
            raise TypeError(f"WithSlots model must build an nn.Module, got {type(net).__name__}")
        self.num_classes = num_classes
        #: the wrapped network's class name (the HParams ``backbone/model`` column)
        self.model_name = type(net).__name__
        self.input_size = tuple(int(s) for s in input_size)
        example = torch.zeros(2, *self.input_size)
        specs = self._parse_slots(slots)
        classifier = find_classifier(net, head)
        self._needs_targets = False
        self._sites: list[tuple[str, str, nn.Module]] = []  # (full name, where, layer)
        try:
            traced = trace_model(net)
        except RuntimeError as err:
            self.traced, self.trace_error = False, str(err)
            self.model = self._wrap_modules(net, specs, classifier, example)
        else:
            self.traced, self.trace_error = True, None
            self.model = self._rewrite_graph(net, traced, specs, classifier)
        ids = {id(m): n for n, m in self.named_modules()}
        self._slot_paths = {full: (ids[id(layer)], where) for full, where, layer in self._sites}
        self._sites = []  # paths only from here: copies (deepcopy, DropMaskImages) resolve their own layers
        if num_classes is not None:
            check_output_width(self, num_classes, example, f"WithSlots model {type(net).__name__}")

    # ---------------------------------------------------------------- slots

    @staticmethod
    def _parse_slots(slots: Any) -> dict[str, tuple[list[str], list[str], Any]]:
        if slots is None:
            return {}
        if not isinstance(slots, Mapping):
            raise TypeError(f"WithSlots slots must map slot name -> {{after, before, layer}}, got {slots!r}")
        out = {}
        for name, entry in slots.items():
            if not isinstance(name, str) or not name.isidentifier() or hasattr(nn.ModuleDict(), name):
                raise ValueError(f"slot name {name!r} must be a Python identifier (and not a ModuleDict method)")
            entry = entry.as_dict() if callable(getattr(entry, "as_dict", None)) else entry
            if not isinstance(entry, Mapping) or "layer" not in entry or set(entry) - {"after", "before", "layer"}:
                raise ValueError(
                    f"slot {name!r} must be {{after: positions, before: positions, layer: class_path entry}}, got "
                    f"{entry!r}"
                )
            after = position_list(entry.get("after"), f"slot {name!r} after")
            before = position_list(entry.get("before"), f"slot {name!r} before")
            if not after and not before and name != "head":
                raise ValueError(f"slot {name!r} needs `after:` or `before:` positions (only `head` has a default)")
            out[name] = (after, before, entry["layer"])
        return out

    def _make_layer(self, slot: str, spec: Any) -> nn.Module:
        if isinstance(spec, nn.Module):
            layer = copy.deepcopy(spec)
        elif isinstance(spec, (Mapping, str)) or inspect.isclass(spec) or hasattr(spec, "as_dict"):
            layer = build_from_spec(spec, f"slot {slot!r} layer")
        elif callable(spec):
            layer = spec()
        else:
            raise TypeError(f"slot {slot!r} layer must be a class_path entry, a factory or an nn.Module, got {spec!r}")
        return check_slot_layer(layer, spec, slot, "WithSlots")

    def _placements(
        self, specs: dict[str, tuple[list[str], list[str], Any]], names: list[str], classifier: str | None
    ) -> list[tuple[str, list[tuple[str, str]], Any]]:
        """slot -> [(side, position)] in forward order; positions taken twice are refused."""
        order = {n: i for i, n in enumerate(names)}
        taken: dict[tuple[str, str], str] = {}
        out = []
        for slot, (after, before, spec) in specs.items():
            if slot == "head" and not after and not before:
                if classifier is None:
                    raise ValueError(
                        "slot 'head' goes before the classifier, but the model has none that maxdrop can find "
                        "(no get_classifier(), fc, classifier or head): give its module path as "
                        "`head: <module path>`, or place the slot with after:/before:"
                    )
                first = next((n for n in names if n == classifier or n.startswith(classifier + ".")), None)
                if first is None:
                    raise ValueError(f"the classifier {classifier!r} does not run in the model's forward")
                before = [first]
            sites = [("after", p) for p in expand_patterns(after, names, f"slot {slot!r} after")]
            sites += [("before", p) for p in expand_patterns(before, names, f"slot {slot!r} before")]
            sites.sort(key=lambda s: (order[s[1]], s[0] == "after"))
            for site in sites:
                if site in taken:
                    raise ValueError(f"position {site[0]} {site[1]!r} is in slots {taken[site]!r} and {slot!r}")
                taken[site] = slot
            out.append((slot, sites, spec))
        return out

    def _record(self, slot: str, i: int, n: int, side: str, pos: str, layer: nn.Module) -> None:
        self._sites.append((slot if n == 1 else f"{slot}.{i}", f"{side} {pos}", layer))
        self._needs_targets |= bool(getattr(layer, "needs_targets", False))

    def _rewrite_graph(self, net: nn.Module, t: TracedModel, specs: dict, classifier: str | None) -> fx.GraphModule:
        graph = t.graph
        gm = fx.GraphModule(net, graph, class_name=type(net).__name__)
        container = nn.ModuleDict()
        gm.add_module(SLOTS_ATTR, container)
        nodes = {q: n for n, q in t.names.items()}
        for slot, sites, spec in self._placements(specs, t.order, classifier):
            container[slot] = nn.ModuleList()
            for i, (side, pos) in enumerate(sites):
                layer = self._make_layer(slot, spec)
                container[slot].append(layer)
                target = f"{SLOTS_ATTR}.{slot}.{i}"
                if pos in nodes:
                    self._insert_at_node(graph, nodes[pos], target, side, pos, layer, classifier)
                else:
                    self._insert_at_module(graph, t.modules[pos], target, side, pos, layer)
                self._record(slot, i, len(sites), side, pos, layer)
        graph.lint()
        gm.recompile()
        return gm

    @staticmethod
    def _insert_after(graph: fx.Graph, node: fx.Node, target: str) -> None:
        with graph.inserting_after(node):
            new = graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    @classmethod
    def _insert_at_module(
        cls,
        graph: fx.Graph,
        call: tuple[fx.Node, fx.Node | None, set[fx.Node]],
        target: str,
        side: str,
        pos: str,
        layer: nn.Module,
    ) -> None:
        out, first, members = call
        if getattr(layer, "needs_targets", False):
            raise ValueError(
                f"{type(layer).__name__} needs the classifier: put it in the `head` slot without positions"
            )
        if side == "after":
            cls._insert_after(graph, out, target)
            return
        if first is None:
            raise ValueError(f"position before {pos!r}: that module has no tensor input to put a layer on")
        users = [u for u in first.users if u in members]
        with graph.inserting_before(min(users, key=lambda u: list(graph.nodes).index(u))):
            new = graph.call_module(target, (first,))
        for user in users:
            user.replace_input_with(first, new)

    @classmethod
    def _insert_at_node(
        cls, graph: fx.Graph, node: fx.Node, target: str, side: str, pos: str, layer: nn.Module, classifier: str | None
    ) -> None:
        if side == "after":
            if getattr(layer, "needs_targets", False):
                raise ValueError(
                    f"{type(layer).__name__} needs the classifier: put it in the `head` slot without positions"
                )
            cls._insert_after(graph, node, target)
            return
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node):
            raise ValueError(f"position before {pos!r}: that node has no tensor input to put a layer on")
        if not getattr(layer, "needs_targets", False):
            with graph.inserting_before(node):
                new = graph.call_module(target, (arg,))
            node.replace_input_with(arg, new)
            return
        if node.op != "call_module" or node.target != classifier:
            raise ValueError(
                f"{type(layer).__name__} needs the classifier as one module call, but the position before {pos!r} "
                f"is not a call of the classifier {classifier!r} (give `head: <module path>` of a single module)"
            )
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(placeholders[-1]):
            targets = graph.placeholder("targets", default_value=None)
        with graph.inserting_before(node):
            classify = graph.get_attr(classifier)
            new = graph.call_module(target, (arg, targets, classify))
        node.replace_input_with(arg, new)

    def _wrap_modules(self, net: nn.Module, specs: dict, classifier: str | None, example: Tensor) -> nn.Module:
        calls = module_calls(net, example)
        mods = dict(net.named_modules())
        for slot, sites, spec in self._placements(specs, list(calls), classifier):
            for i, (side, pos) in enumerate(sites):
                if calls[pos] > 1:
                    raise ValueError(
                        f"module {pos!r} runs {calls[pos]} times per forward, so a layer {side} it would run at "
                        f"each call; {type(net).__name__} does not trace with torch.fx ({self.trace_error}), where "
                        f"each call would be a position of its own. Give a position that runs once, e.g. "
                        f"{side} a module that contains {pos!r} or one of its submodules"
                    )
                layer = self._make_layer(slot, spec)
                if getattr(layer, "needs_targets", False):
                    raise ValueError(
                        f"{type(layer).__name__} in slot {slot!r} needs a model that traces with torch.fx; "
                        f"{type(net).__name__} does not ({self.trace_error})"
                    )
                parent_name, _, child = pos.rpartition(".")
                parent = mods[parent_name] if parent_name else net
                wrapper = getattr(parent, child)
                if not isinstance(wrapper, _Around):
                    wrapper = _Around(mods[pos])
                    setattr(parent, child, wrapper)
                setattr(wrapper, side, layer)
                self._record(slot, i, len(sites), side, pos, layer)
        return net

    # ---------------------------------------------------------------- SlottedBackbone interface

    @property
    def needs_targets(self) -> bool:
        return self._needs_targets

    def _slot_sites(self):
        for full, (path, where) in self._slot_paths.items():
            yield full, where, self.get_submodule(path)

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """(N, *input_size) -> (N, num_classes) logits; ``targets`` reach only a ``needs_targets`` head layer."""
        if targets is not None and self._needs_targets:
            return self.model(x, targets)
        return self.model(x)
