"""The search space of `maxdrop tune`, read from YAML beside the configs (configs/tune/...).

config: ../../study2/dropout_p01.yaml        # the row's config, relative to this file
knobs:
  p:                                         # one knob may set several keys (all of a row's slots)
    type: float                              # float | int | categorical
    low: 0.0
    high: 0.7
    log: false                               # float/int only
    keys:
      - model.init_args.backbone.init_args.slots.stage1.init_args.p
      - model.init_args.backbone.init_args.slots.stage2.init_args.p
  rescale: {type: categorical, choices: [true, false], keys: [...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Knob:
    name: str
    type: str
    keys: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class Space:
    path: Path
    config: Path
    knobs: tuple[Knob, ...]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """`maxdrop fit` arguments that set every key of every knob (values as JSON, which jsonargparse reads)."""
        out: list[str] = []
        for knob in self.knobs:
            for key in knob.keys:
                out += [f"--{key}", json.dumps(params[knob.name])]
        return out


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"search space {path}: {what}")


def _knob(path: Path, name: str, spec: Any) -> Knob:
    if not isinstance(spec, dict):
        raise _bad(path, f"knob {name!r} must be a mapping with type, keys and its range, got {spec!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise _bad(path, f"knob {name!r} has type {kind!r}; allowed: {', '.join(TYPES)}")
    keys = spec.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise _bad(path, f"knob {name!r} needs `keys:`, a non-empty list of config keys (e.g. model.init_args.x)")
    unknown = set(spec) - {"type", "keys", "low", "high", "log", "step", "choices"}
    if unknown:
        raise _bad(path, f"knob {name!r} has unknown fields {sorted(unknown)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _bad(path, f"categorical knob {name!r} needs `choices:`, a non-empty list")
        return Knob(name, kind, tuple(keys), choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
        raise _bad(path, f"{kind} knob {name!r} needs numbers low < high, got low={low!r}, high={high!r}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise _bad(path, f"knob {name!r} is log-scaled, so low must be > 0, got {low!r}")
    return Knob(name, kind, tuple(keys), float(low), float(high), log, spec.get("step"))


def load_space(path: Path) -> Space:
    """Read and check a search-space file; ValueError naming the bad field otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"search space file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "config" not in data or "knobs" not in data:
        raise _bad(path, "needs `config:` (the row's config, relative to this file) and `knobs:`")
    config = (path.parent / data["config"]).resolve()
    if not config.is_file():
        raise _bad(path, f"config {data['config']!r} not found (looked for {config})")
    knobs = data["knobs"]
    if not isinstance(knobs, dict) or not knobs:
        raise _bad(path, "`knobs:` must map knob names to their specs")
    return Space(path, config, tuple(_knob(path, n, s) for n, s in knobs.items()))
