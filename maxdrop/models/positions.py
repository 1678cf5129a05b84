"""The positions of a model's forward where a layer can go, named as torchvision names fx graph nodes.

The model is traced with torch.fx (torchvision's ``NodePathTracer``, with timm's leaf modules and
untraceable functions when timm is installed). Every graph node is a position, named as
``torchvision.models.feature_extraction.get_graph_node_names`` names it (``layer1.0.relu_1`` is the
second call of ``layer1.0.relu``; functional ops such as ``F.relu`` or ``x + y`` are positions too), and
so is every call of a traced-through module (``layer1``: after/before its whole forward). A model
that does not trace, or traces differently in train and eval mode, has its named modules as positions.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = [
    "Position",
    "TracedModel",
    "expand_patterns",
    "find_classifier",
    "format_positions",
    "model_positions",
    "module_calls",
    "position_list",
    "trace_model",
]


@dataclass(frozen=True)
class Position:
    """A place in the forward where a layer can go: ``name`` (the fx node or module name), ``kind``
    (the module class, function or method name), how often that module runs per forward and the
    output shape in a dry forward (None when unknown)."""

    name: str
    kind: str
    calls: int = 1
    shape: tuple[int, ...] | None = None


def _tracer_kwargs() -> dict[str, Any]:
    try:  # timm's own list of modules and functions that fx must not trace through
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:
        return {}
    return {"leaf_modules": list(get_notrace_modules()), "autowrap_functions": list(get_notrace_functions())}


def _tracer_class() -> type:
    from torchvision.models.feature_extraction import NodePathTracer

    class ModuleCallTracer(NodePathTracer):
        """torchvision's NodePathTracer that also records each traced-through module call: its output
        node, its input node and the nodes it made (so that ``layer1`` is a position, as its nodes are)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.created: list[fx.Node] = []
            self.module_calls: dict[str, tuple[fx.Node, fx.Node | None, set[fx.Node]]] = {}
            self.call_counts: dict[str, int] = {}

        def create_proxy(self, *args: Any, **kwargs: Any) -> fx.Proxy:
            proxy = super().create_proxy(*args, **kwargs)
            self.created.append(proxy.node)
            return proxy

        def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
            path = self.path_of_module(m)
            if not path or self.is_leaf_module(m, path):
                return super().call_module(m, forward, args, kwargs)
            start = len(self.created)
            out = super().call_module(m, forward, args, kwargs)
            k = self.call_counts.get(path, 0)
            self.call_counts[path] = k + 1
            if isinstance(out, fx.Proxy):
                first = args[0].node if args and isinstance(args[0], fx.Proxy) else None
                self.module_calls[path if k == 0 else f"{path}_{k}"] = (out.node, first, set(self.created[start:]))
            return out

    return ModuleCallTracer


@dataclass
class TracedModel:
    """A traced model: its graph, node -> name, module call name -> (output, input, member nodes), and
    every position name in forward order."""

    graph: fx.Graph
    names: dict[fx.Node, str]
    modules: dict[str, tuple[fx.Node, fx.Node | None, set[fx.Node]]]
    counts: dict[str, int]
    order: list[str]


def trace_model(model: nn.Module) -> TracedModel:
    """The train-mode fx graph of ``model`` with torchvision's node names and the module-call positions.

    Raises:
        RuntimeError: the model does not trace, or traces differently in eval mode.
    """
    from torchvision.models.feature_extraction import _set_default_tracer_kwargs

    was_training = model.training
    traced = []
    try:
        for mode in (True, False):
            tracer = _tracer_class()(**_set_default_tracer_kwargs(_tracer_kwargs()))
            graph = tracer.trace(model.train(mode))
            names = dict(tracer.node_to_qualname)
            after: dict[fx.Node, list[str]] = {}
            for name, (out, _, _) in tracer.module_calls.items():
                after.setdefault(out, []).append(name)
            order = []
            for node in graph.nodes:
                if node.op != "output":
                    order += [names[node]] + [m for m in after.get(node, []) if m != names[node]]
            traced.append(TracedModel(graph, names, tracer.module_calls, tracer.call_counts, order))
    except Exception as err:  # noqa: BLE001 (any tracing failure means: use module boundaries)
        raise RuntimeError(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    if traced[0].order != traced[1].order:
        raise RuntimeError(f"{type(model).__name__} traces to different graphs in train and eval mode")
    return traced[0]


def _node_kind(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def module_calls(model: nn.Module, example: Tensor | None) -> dict[str, int]:
    """How often each named submodule runs in one forward of ``example`` (forward order), or {}."""
    return _run_modules(model, example)[0]


def _run_modules(model: nn.Module, example: Tensor | None) -> tuple[dict[str, int], dict[str, tuple | None]]:
    """Calls per forward and last output shape of each named submodule in a dry eval-mode forward."""
    calls: dict[str, int] = {}
    shapes: dict[str, tuple | None] = {}
    if example is None:
        return calls, shapes

    def pre(mod: nn.Module, args: Any, name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    def post(mod: nn.Module, args: Any, out: Any, name: str) -> None:
        shapes[name] = _shape(out)

    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: pre(mod, args, name)))
            handles.append(m.register_forward_hook(lambda mod, args, out, name=name: post(mod, args, out, name)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls, shapes


def _node_shapes(model: nn.Module, t: TracedModel, example: Tensor) -> dict[fx.Node, tuple | None]:
    """Output shape of every node of ``t.graph`` in a dry eval-mode run (torch.fx's ShapeProp)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.GraphModule(model, t.graph)
    was_training = model.training
    try:
        with torch.no_grad():
            ShapeProp(gm.eval()).propagate(example)
    except Exception:  # noqa: BLE001 (shapes are informative only)
        return {}
    finally:
        model.train(was_training)
    meta = {n: n.meta.get("tensor_meta") for n in t.graph.nodes}
    return {n: tuple(m.shape) if hasattr(m, "shape") else None for n, m in meta.items()}


def model_positions(model: nn.Module, example: Tensor | None = None) -> tuple[list[Position], bool]:
    """Every position of ``model`` in forward order and whether they are fx graph nodes (True) or
    module boundaries (False, when the model does not trace). ``example`` (an (N, C, H, W) input)
    gives the module call counts and the output shapes."""
    calls, mod_shapes = _run_modules(model, example)
    try:
        t = trace_model(model)
    except RuntimeError:
        mods = dict(model.named_modules())
        if not calls:
            return [Position(n, type(m).__name__) for n, m in mods.items() if n], False
        return [Position(n, type(mods[n]).__name__, c, mod_shapes.get(n)) for n, c in calls.items()], False
    shapes = _node_shapes(model, t, example) if example is not None else {}
    nodes = {q: n for n, q in t.names.items()}
    out = []
    for name in t.order:
        node = nodes.get(name)
        if node is not None:
            count = calls.get(node.target, 1) if node.op == "call_module" else 1
            out.append(Position(name, _node_kind(node, model), count, shapes.get(node)))
        else:
            path = name if name in t.counts else name.rpartition("_")[0]
            shape = shapes.get(t.modules[name][0])
            out.append(Position(name, type(model.get_submodule(path)).__name__, t.counts[path], shape))
    return out, True


def format_positions(positions: list[Position], filled: dict[str, str] | None = None) -> str:
    """A table of positions: name, type, output shape per image, how often the module runs per forward
    (a module called twice has a position per call), and the slot that fills it."""
    filled = filled or {}
    rows = [("position", "type", "output shape", "module calls", "slot")]
    for p in positions:
        shape = "x".join(map(str, p.shape[1:])) if p.shape is not None else "-"  # per image
        rows.append((p.name, p.kind, shape, str(p.calls), filled.get(p.name, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def position_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where} must be a position name or a list of them, got {value!r}")


def expand_patterns(patterns: list[str], names: list[str], where: str) -> list[str]:
    """Glob ``patterns`` over ``names`` (forward order kept); a pattern that matches nothing is an error."""
    out: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=6, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else f"the first positions are {', '.join(names[:8])}"
            raise ValueError(
                f"{where}: {pattern!r} matches no position of the model ({hint}); `maxdrop slots <model>` lists "
                "every position"
            )
        out += [n for n in hits if n not in out]
    return out


def find_classifier(model: nn.Module, head: str | None) -> str | None:
    """The module path of ``model``'s classifier: ``head`` if given, else timm's ``get_classifier()``,
    else torchvision's ``fc`` / ``classifier`` / ``head``; None when none is found."""
    if head is not None:
        try:
            model.get_submodule(head)
        except AttributeError as err:
            raise ValueError(f"head={head!r} is not a submodule of {type(model).__name__}") from err
        return head
    get = getattr(model, "get_classifier", None)
    if callable(get):
        found = get()
        for name, m in model.named_modules():
            if m is found and name:
                return name
    for name in ("fc", "classifier", "head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None
