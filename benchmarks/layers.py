"""Forward+backward time and peak memory of the dropout layers, side by side in one process.

    python benchmarks/layers.py [--shape 128 64 32 32] [--repeats 15] [--only TopK]

Input: a post-ReLU float32 tensor (default (128, 64, 32, 32)). Prints ms per forward+backward
(median over repeats, layers interleaved so that machine noise hits all alike), ratios to
``nn.Dropout(0.3)`` and to a direct transcription of the authors' layer, and the peak of live
CPU memory during one forward+backward, in units of the input's size. ``--only WORD`` times the
layers whose name contains WORD (case-insensitive) next to the two references. The 1-minute load
average, torch's thread count and the CPU time other processes took while timing are printed
with the figures (a warning when either says the machine was not quiet).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maxdrop import ADL, DualAttentionDropBlock, MaxDropout, MaxDropoutV2, TopDropBlock, TopKDropout

sys.path.insert(0, str(Path(__file__).parent))
from _load import OtherWork, load_line  # noqa: E402
from _memory import PeakHeap  # noqa: E402

REFERENCES = ("nn.Dropout(0.3)", "authors' MaxDropout")


class AuthorsMaxDropout(nn.Module):
    """The authors' layer, transcribed (training mode)."""

    def __init__(self, drop: float = 0.3) -> None:
        super().__init__()
        self.drop = 1 - drop

    def forward(self, x):
        up = x - x.min()
        divisor = x.max() - x.min()
        x_copy = torch.div(up, divisor)
        mask = x_copy > self.drop
        return x.masked_fill(mask > 0.5, 0)


def layers() -> dict[str, nn.Module]:
    return {
        "nn.Dropout(0.3)": nn.Dropout(0.3),
        "authors' MaxDropout": AuthorsMaxDropout(0.3),
        "MaxDropout tensor": MaxDropout(0.3, scope="tensor"),
        "MaxDropout tensor, no stats": MaxDropout(0.3, scope="tensor", track_stats=False),
        "MaxDropout sample": MaxDropout(0.3, scope="sample"),
        "MaxDropout channel": MaxDropout(0.3, scope="channel"),
        "MaxDropoutV2": MaxDropoutV2(0.3),
        "TopKDropout tensor": TopKDropout(0.3, scope="tensor"),
        "TopKDropout sample": TopKDropout(0.3, scope="sample"),
        "TopKDropout channel": TopKDropout(0.3, scope="channel"),
        "TopDropBlock": TopDropBlock(0.33),
        "ADL(0.75, 0.8)": ADL(0.75, 0.8),
        "ADL drop-mask steps": ADL(1.0, 0.8),
        "ADL importance-map steps": ADL(0.0, 0.8),
        "DualAttentionDropBlock": DualAttentionDropBlock(),
        "DualAttentionDropBlock blocks": DualAttentionDropBlock(drop_rate=1.0),
    }


def numpy_simd() -> str:
    """NumPy's version and its best x86 SIMD level found: its sorts dispatch on it (AVX-512 vs AVX2)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # a NumPy without that table
        return f"NumPy {np.__version__}"
    levels = [f for f in ("AVX512_SPR", "AVX512_ICL", "AVX512_SKX", "AVX2") if found.get(f)]
    return f"NumPy {np.__version__} ({levels[0] if levels else 'no AVX2'})"


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer(x).backward(grad)
    x.grad = None


def peak_memory(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak heap growth in bytes during one forward+backward (output, saved tensors, input grad)."""
    step(layer, x, grad)  # warm allocator state
    with PeakHeap() as m:
        step(layer, x, grad)
    return m.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 64, 32, 32])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", metavar="WORD", help="time only the layers whose name contains WORD (+ references)")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(*args.shape).relu().requires_grad_()
    grad = torch.randn_like(x)
    keep = lambda name: args.only is None or name in REFERENCES or args.only.lower() in name.lower()  # noqa: E731
    mods = {name: m.train() for name, m in layers().items() if keep(name)}
    if len(mods) == len(REFERENCES):
        parser.error(f"--only {args.only!r} matches no layer; names: {', '.join(layers())}")
    start_load = load_line("at the start")
    for m in mods.values():  # warm-up
        step(m, x, grad)
    times: dict[str, list[float]] = {name: [] for name in mods}
    with OtherWork() as other:
        for _ in range(args.repeats):
            for name, m in mods.items():
                t0 = time.perf_counter()
                step(m, x, grad)
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ref_do, ref_auth = med["nn.Dropout(0.3)"], med["authors' MaxDropout"]
    in_bytes = x.numel() * x.element_size()
    shape = tuple(x.shape)
    print(f"input {shape} float32 post-ReLU, torch {torch.__version__}, {numpy_simd()}, {args.repeats} repeats")
    print(start_load)
    print(load_line("at the end", includes_self=True))
    print(other.line())
    print(f"{'layer':<30} {'fwd+bwd ms':>10} {'x Dropout':>10} {'x authors':>10} {'peak mem / input':>17}")
    for name, m in mods.items():
        peak = peak_memory(m, x, grad) / in_bytes
        print(f"{name:<30} {med[name]:>10.1f} {med[name] / ref_do:>10.2f} {med[name] / ref_auth:>10.2f} {peak:>17.2f}")
    print("peak memory budget: output (1.00) + one bool mask (0.25) + the input's gradient (1.00) = 2.25 x input")
    print("targets: TopKDropout <= 1.0 x Dropout (sample, channel), <= 1.5 x (tensor); TopDropBlock <= 0.5 x")
    print("targets: ADL, DualAttentionDropBlock <= 1.0 x Dropout")


if __name__ == "__main__":
    main()
