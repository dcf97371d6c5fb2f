"""Timing and memory helpers shared by the benchmarks: best-of-N seconds, the matmul peak of this
machine under the current thread count, the peak resident memory of a block, and the peak bytes
autograd holds for backward (the activations) while a block runs."""
from __future__ import annotations

import os
import threading
import time

import torch
import torch.nn.functional as F

from ..fast import onednn


def matmul_peaks(size: int = 2048, repeats: int = 5) -> dict:
    """{library: GFLOP/s} of the best of a few fp32 (size × size) products under the current thread
    count, through torch.mm (MKL on x86 wheels) and through oneDNN (minibge/fast/onednn.py). The "% of
    peak" column divides by the faster of the two: on some CPUs they differ by 2× (docs/benchmarks.md
    has a measured case), and the peak should be the machine's, not one library's."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = {"torch.mm": lambda: a @ b}
    if onednn.available(a):
        products["oneDNN"] = lambda: onednn.linear(a, b)
    with torch.inference_mode():
        return {name: 2 * size ** 3 / best_seconds(product, repeats) / 1e9 for name, product in products.items()}


# (rows, in, out) of BERT's matmuls: MiniLM's fused QKV, up and down projections; bge-base's QKV and down
BERT_MATMULS = ((4096, 384, 1152), (4096, 384, 1536), (4096, 1536, 384), (512, 768, 2304), (512, 3072, 768))


def matmul_libraries(shapes=BERT_MATMULS, repeats: int = 20) -> str:
    """A markdown table of GFLOP/s on fp32 (rows, in, out) products, best of `repeats` under the
    current thread count: F.linear (PyTorch's BLAS, MKL on x86 wheels) beside oneDNN (fast/onednn.py).
    The measurement behind using oneDNN in the fast path and in training (docs/benchmarks.md):

        python -c "from minibge.bench import matmul_libraries; print(matmul_libraries())"
    """
    lines = [f"{torch.get_num_threads()} threads", "", "| rows × in → out | F.linear GFLOP/s | oneDNN GFLOP/s |",
             "|---|---|---|"]
    with torch.inference_mode():
        for n, d_in, d_out in shapes:
            x, w, b = torch.randn(n, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
            flops = 2 * n * d_in * d_out / 1e9
            torch_rate = flops / best_seconds(lambda: F.linear(x, w, b), repeats)
            onednn_rate = (f"{flops / best_seconds(lambda: onednn.linear(x, w, b), repeats):.0f}"
                           if onednn.available(x) else "unavailable")
            lines.append(f"| {n} × {d_in} → {d_out} | {torch_rate:.0f} | {onednn_rate} |")
    return "\n".join(lines)


def best_seconds(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    return min(_seconds(fn) for _ in range(repeats))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeakRSS:
    """Highest resident set size while the block runs, sampled every few ms from /proc (Linux)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


class SavedTensorBytes:
    """The most bytes autograd held for backward at once while the block ran: the activations.

    Every tensor a graph saves for backward (torch.autograd.graph.saved_tensors_hooks) counts from
    when it is saved until the graph lets go of it (after its backward, or when it is dropped); a
    storage saved by several ops counts once, and the tensors in `exclude` (the parameters) not at
    all. A size, not a time: the same on any machine and under any load, for a test to bound.
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage address → [saved tensors holding it, its bytes]
        self.bytes = self.peak = 0

    def _pack(self, tensor: torch.Tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.exclude or key == 0:
            return tensor
        return _Held(self, tensor, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Held) else saved

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


class _Held:
    """A saved tensor, counted in its SavedTensorBytes while the graph keeps this wrapper alive."""

    def __init__(self, counter: SavedTensorBytes, tensor: torch.Tensor, key: int):
        self.counter, self.tensor, self.key = counter, tensor, key
        entry = counter.live.setdefault(key, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            counter.bytes += entry[1]
            counter.peak = max(counter.peak, counter.bytes)
        entry[0] += 1

    def __del__(self):
        entry = self.counter.live[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.counter.bytes -= entry[1]
            del self.counter.live[self.key]
