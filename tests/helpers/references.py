"""The dropout rules written out directly, one element at a time, as the references the layers (and the
counts the monitors report) are checked against: MaxDropout and MaxDropoutV2 (the authors' code),
TopKDropout, TopDropBlock (Top-DB-Net), ProbGuidedMaxout, DGDM."""

from __future__ import annotations

import math

import numpy as np
import torch


def authors_dropped(x: torch.Tensor, p: float) -> int:
    """Elements the authors' MaxDropout drops (tensor scope): min-max normalized value > 1 - p."""
    z = (x - x.min()) / (x.max() - x.min())
    return int((z > 1 - p).sum())


def v2_dropped(x: torch.Tensor, p: float) -> int:
    """Elements MaxDropoutV2 drops: positions of the channel-summed map above 1 - p per sample, x C."""
    s = x.sum(1).flatten(1)
    mn, mx = s.min(1, keepdim=True).values, s.max(1, keepdim=True).values
    return int(((s - mn) / (mx - mn) > 1 - p).sum()) * x.shape[1]


def sorted_floats(values: list[float]) -> list[float]:
    """Ascending, NaN after every number (torch.sort's order)."""
    return sorted(values, key=lambda v: (math.isnan(v), v))


def scope_rows(x: torch.Tensor, scope: str) -> torch.Tensor:
    """(rows, n): one row per scope, in logical element order."""
    start = {"tensor": 0, "global": 0, "sample": 1, "channel": 2}[scope]
    return x.reshape(1, -1) if start == 0 else x.reshape(math.prod(x.shape[:start]), -1)


def topk_reference(x: torch.Tensor, rate: float, scope: str) -> torch.Tensor:
    """TopKDropout's rule, literally: per scope, k = round(rate * n); drop the values > the (n - k)-th smallest."""
    rows = scope_rows(x, scope).tolist()
    mask = []
    for row in rows:
        n = len(row)
        k = round(rate * n)
        if k == 0:
            mask.append([False] * n)
        elif k == n:
            mask.append([True] * n)
        else:
            t = sorted_floats(row)[n - k - 1]
            mask.append([v > t for v in row])
    return torch.tensor(mask, dtype=torch.bool).reshape(x.shape)


def top_drop_block_reference(x: torch.Tensor, h_ratio: float) -> torch.Tensor:
    """Top-DB-Net's rule, literally: per sample, row score = max over w of sum over c of x**2; the
    round(h_ratio * H) rows with the highest scores are dropped; equal scores: a stable ascending
    sort, the last rows of it dropped (the higher index first)."""
    n, c, h, w = x.shape
    rh = round(h_ratio * h)
    mask = torch.zeros(n, 1, h, 1, dtype=torch.bool)
    for i in range(n):
        scores = [max(sum(float(x[i, ch, r, col]) ** 2 for ch in range(c)) for col in range(w)) for r in range(h)]
        order = sorted(range(h), key=lambda r: scores[r])
        for r in order[h - rh :]:
            mask[i, 0, r, 0] = True
    return mask


def prob_guided_maxout_reference(x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0):
    """ProbGuidedMaxout's rule, one unit at a time: (dropped (N, D) bool, output (N, D) float64).

    q = softmax(logits)[target] (non-finite -> 0), keep = 1 - q/2 and D * keep in float32, kept units
    = the round(D * keep) smallest (Python's round; ties ranked by index), kept * scale / keep.
    """
    n, d = x.shape
    xs, ls = x.double().tolist(), logits.double().tolist()
    dropped, out = [], []
    for i in range(n):
        top = max(ls[i])
        exps = [math.exp(v - top) for v in ls[i]]
        q = np.float32(exps[int(targets[i])] / sum(exps))
        if not np.isfinite(q):
            q = np.float32(0.0)
        keep = np.float32(1.0) - q * np.float32(0.5)
        n_keep = round(float(np.float32(d) * keep))
        row = xs[i]
        drop = []
        for j in range(d):
            rank = sum(1 for k in range(d) if row[k] < row[j] or (row[k] == row[j] and k < j))
            drop.append(rank >= n_keep)
        dropped.append(drop)
        out.append([0.0 if drop[j] else row[j] * scale / float(keep) for j in range(d)])
    return torch.tensor(dropped, dtype=torch.bool).view(n, d), torch.tensor(out, dtype=torch.float64).view(n, d)


def dgdm_reference(x, top_k_ratio, channel_drop_rate, drop_rate, drop_threshold, block_size, generator):
    """DGDM's rules (maxdrop/layers/dgdm.py's docstring), written out directly, same draws in the same order.

    Returns the output, the branch (True = blocks erased) and the (N, C, H, W) mask of the zeroed elements."""
    use_drop = bool((torch.rand([], dtype=torch.float32, generator=generator) + drop_rate).floor() >= 1)
    u = torch.rand(x.shape[:2], generator=generator)
    n, c, h, w = x.shape
    k = round(top_k_ratio * c)
    keep_c = torch.ones(n, c, 1, 1)
    for i in range(n):
        order = sorted(range(c), key=lambda j: (-float(x[i, j].float().mean()), j))
        for j in order[:k]:
            if u[i, j] < channel_drop_rate:
                keep_c[i, j] = 0
    s = x.mean(1, keepdim=True)
    if use_drop:
        keep_s = torch.ones(n, 1, h, w)
        for i in range(n):
            t = s[i].max() * drop_threshold
            for a in range(h):
                for b in range(w):
                    if not s[i, 0, a, b] < t:
                        r = block_size // 2
                        keep_s[i, 0, max(a - r, 0) : a + r + 1, max(b - r, 0) : b + r + 1] = 0
        zeroed = ((keep_c * keep_s) == 0).expand(n, c, h, w)
        return torch.where(zeroed, 0, x), use_drop, zeroed
    zeroed = (keep_c == 0).expand(n, c, h, w)
    return torch.where(zeroed, 0, x * torch.sigmoid(s)), use_drop, zeroed
