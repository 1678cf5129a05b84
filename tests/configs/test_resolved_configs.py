"""Every shipped config resolves to the same full config as the snapshot printed before the study
configs were split into a shared base plus the lines each row changes (see resolve.py)."""

import pytest
import yaml

from .resolve import SNAPSHOTS, cases, resolve

CASES = cases()
#: Classes that moved to another module (the old path still imports them): where a config gives no class_path,
#: LightningCLI prints the default class's own module path: both paths name the same class.
MOVED = {"maxdrop.module.ClassificationModule": "maxdrop.training.module.ClassificationModule"}


def _leaves(tree, prefix=()):
    """(key path, value) for every leaf of a parsed config; lists are compared whole."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, tree


def _moved(value):
    return MOVED.get(value, value) if isinstance(value, str) else value


def test_every_config_has_a_snapshot_and_every_snapshot_a_config():
    assert {p.stem for p in SNAPSHOTS.glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n.endswith(("__n100", "__n250")) else n for n in CASES]
)
def test_config_resolves_as_before(name):
    before = yaml.safe_load((SNAPSHOTS / f"{name}.yaml").read_text())
    now = yaml.safe_load(resolve(CASES[name]))
    assert now, f"{name}: `maxdrop fit --config ... --print_config` printed nothing"
    # Every key of the snapshot keeps its value; keys that later code adds (new options, with their
    # defaults) are not a change of the config.
    now_leaves = {k: _moved(v) for k, v in _leaves(now)}
    changed = {
        ".".join(map(str, k)): (v, now_leaves.get(k, "<missing>"))
        for k, v in _leaves(before)
        if now_leaves.get(k, "<missing>") != _moved(v)
    }
    assert not changed, f"{name}: keys that resolve differently now (before, now): {changed}"
