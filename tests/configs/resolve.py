"""Resolve a shipped config to the full config `maxdrop fit --config ... --print_config` prints.

The snapshots under resolved/ were printed from the configs as they were before the study configs
were split into a shared base plus the lines each row changes; test_resolved_configs.py checks that
every config still resolves to the same full config. Regenerate (only when a config is meant to change):
    python tests/configs/resolve.py --write
A new config gets its snapshot with ``--add`` (only configs without one).
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SNAPSHOTS = Path(__file__).resolve().parent / "resolved"
PARTS = ("data", "model", "trainer", "base", "size")  # composed into a full config, not run on their own
SEARCH_SPACES = ("tune",)  # `maxdrop tune` search spaces, not configs of `maxdrop fit`
SIZES = ("n100", "n250")  # study2 overlays, given after a row's config


def cases() -> dict[str, list[str]]:
    """Snapshot name -> the --config files, in order: every full config, and study 2/3 rows per size."""
    out = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if path.parent.name in PARTS or rel.parts[0] in SEARCH_SPACES:
            continue
        name = str(rel.with_suffix("")).replace("/", "__")
        out[name] = [str(rel)]
        if rel.parts[0] in ("study2", "study3"):
            for size in SIZES:
                out[f"{name}__{size}"] = [str(rel), f"study2/size/{size}.yaml"]
    return out


def resolve(configs: list[str]) -> str:
    """The config LightningCLI prints for `maxdrop fit --config A [--config B ...] --print_config`."""
    from maxdrop.cli import main

    args = ["fit"]
    for config in configs:
        args += ["--config", str(CONFIGS / config)]
    buffer = io.StringIO()
    argv = sys.argv
    sys.argv = ["maxdrop"]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main([*args, "--print_config"])
    finally:
        sys.argv = argv
    return buffer.getvalue()


if __name__ == "__main__":
    if "--write" in sys.argv or "--add" in sys.argv:  # --add: only configs that have no snapshot yet
        SNAPSHOTS.mkdir(exist_ok=True)
        for name, configs in cases().items():
            if "--add" in sys.argv and (SNAPSHOTS / f"{name}.yaml").exists():
                continue
            text = resolve(configs)
            assert text.strip(), f"{name}: nothing printed"
            (SNAPSHOTS / f"{name}.yaml").write_text(text)
            print(name, len(text))
