"""Peak heap growth of a block of PyTorch CPU work, measured with glibc's mallinfo2.

A TorchDispatchMode samples the process heap (mmapped blocks + arena bytes in use) after
every aten op, so the peak covers every temporary the ops allocate, forward and backward.
"""

from __future__ import annotations

import ctypes

from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    info = _libc.mallinfo2()
    return info.hblkhd + info.uordblks


class PeakHeap(TorchDispatchMode):
    """``with PeakHeap() as m: ...`` then ``m.peak`` is the peak growth in bytes."""

    def __enter__(self):
        self.base = heap_in_use()
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use() - self.base)
        return out
