"""WithSlots overhead: the same MaxDropout layers inserted by WithSlots (fx-rewritten graph) vs written into
the model by hand (ResNet18's own stage slots), forward + backward, timed side by side in one process.

    python benchmarks/with_slots.py [--width 16] [--batch 64] [--steps 30] [--threads 1]

Both models have the same parameters (same seed) and the same four MaxDropout(0.3) layers after the four
stages; the steps alternate between the two so that machine load hits both alike. Prints the median step
of each, the ratio, the load at the start, the thread count and other processes' CPU use while timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from maxdrop import MaxDropout
from maxdrop.models import ResNet18, WithSlots

sys.path.insert(0, str(Path(__file__).parent))
from _load import OtherWork, load_line  # noqa: E402


def step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    F.cross_entropy(net(x), y).backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    by_hand = ResNet18(width=args.width, slots={f"stage{s}": MaxDropout(0.3) for s in range(1, 5)})
    torch.manual_seed(0)
    stages = {"after": [f"stages.{s}" for s in range(4)], "layer": MaxDropout(0.3)}
    wrapped = WithSlots(ResNet18(width=args.width), {"stages": stages}, num_classes=10)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {"by hand": [], "WithSlots": []}
    start_load = load_line("at the start")
    with OtherWork() as other:
        for i in range(args.steps + 3):
            for name, net in (("by hand", by_hand), ("WithSlots", wrapped))[:: 1 if i % 2 else -1]:
                t = step(net, x, y)
                if i >= 3:  # warm-up steps
                    times[name].append(t)
    hand, wrap = (statistics.median(times[k]) for k in ("by hand", "WithSlots"))
    # Each step of one model is paired with the adjacent step of the other: the per-pair ratios cancel slow
    # drifts of the machine's speed that medians of the two series leave in.
    ratios = sorted(w / h for h, w in zip(times["by hand"], times["WithSlots"], strict=True))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    print(f"ResNet18(width={args.width}), batch {args.batch}, 4 x MaxDropout(0.3), fwd+bwd, median of {args.steps}")
    print(f"  by hand (ResNet18 slots): {hand * 1e3:8.2f} ms")
    print(f"  WithSlots (fx rewrite):   {wrap * 1e3:8.2f} ms")
    print(f"  overhead, ratio of medians:       {100 * (wrap / hand - 1):+.2f} % of a step")
    print(
        f"  overhead, median of paired ratios: {100 * (statistics.median(ratios) - 1):+.2f} % "
        f"(quartiles {100 * (q1 - 1):+.2f} % .. {100 * (q3 - 1):+.2f} %)"
    )
    print(start_load)
    print(other.line())


if __name__ == "__main__":
    main()
