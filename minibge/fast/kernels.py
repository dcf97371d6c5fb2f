"""Which fp32 matmul kernel the fast path runs on this machine: measured, not assumed.

PyTorch's CPU wheels hold two matmul libraries. An fp32 `F.linear` goes to MKL's sgemm; oneDNN
(onednn.py) is the other. Which one is faster depends on the processor: on some CPUs MKL runs
BERT's shapes at half of oneDNN's rate, on others (Intel ones with MKL's own tuning) it is the
faster of the two (docs/benchmarks.md has both). A constant chosen on one machine is wrong on the
next, so the fast path asks `choose_matmul` once per model shape, which times both routes on the
model's own matmul shapes and keeps the faster.

The exact choices:
- What is timed: the four matmuls of one encoder layer (H→3H fused QKV, H→H, H→I, I→H) on ROWS
  packed token rows, each route as the fast path runs it (oneDNN with prepacked weights, MKL
  through F.linear); one warm-up pass, then the best of REPEATS passes per route, in turn.
- The faster route wins; a tie goes to MKL, PyTorch's own default.
- The answer is cached per machine in `<cache>/kernels.json` (`$MINIBGE_CACHE_DIR`, else
  `$XDG_CACHE_HOME/minibge`, else `~/.cache/minibge`), keyed by the CPU model, torch's version,
  the thread count and the shapes, so later processes skip the measurement. The file is read as
  untrusted (anything malformed is ignored and measured again) and written to a unique temporary
  name beside it, then renamed, so two processes never leave half a file.
- Only fp32 on the CPU is measured: other dtypes and devices have one route (F.linear).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import onednn as onednn_kernels

logger = logging.getLogger(__name__)

ROWS = 256     # packed token rows per timed matmul: a small batch, so the measurement stays short
REPEATS = 3    # timed passes per route, after one warm-up; the best one counts
ROUTES = ("mkl", "onednn")


@dataclass(frozen=True)
class MatmulChoice:
    """The route the fast path takes for fp32 matmuls, and the seconds per pass that chose it."""
    route: str                 # "mkl" (F.linear) or "onednn" (onednn.linear, prepacked weights)
    seconds: dict              # route -> best seconds for one pass over a layer's four matmuls
    key: str                   # what the measurement depends on (see cache_key)
    cached: bool = False       # read from the cache file rather than measured in this process

    def describe(self) -> str:
        times = ", ".join(f"{route} {self.seconds[route] * 1e3:.2f} ms" for route in ROUTES if route in self.seconds)
        return f"{self.route} ({times} per layer, {ROWS} rows{'; cached' if self.cached else ''})"


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_key(hidden: int, intermediate: int) -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | H={hidden} I={intermediate}"


def cache_file() -> Path:
    root = os.environ.get("MINIBGE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minibge"
    return Path(root) / "kernels.json"


def read_cache(path: Path) -> dict:
    """{key: {"route": ..., "seconds": {...}}} from the cache file; {} when missing or malformed."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: entry for key, entry in data.items()
            if isinstance(entry, dict) and entry.get("route") in ROUTES and isinstance(entry.get("seconds"), dict)}


def write_cache(path: Path, entries: dict) -> None:
    """The whole cache, to a unique temporary file beside it, renamed into place; failures only logged
    (a read-only home folder must not stop encoding)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        logger.info("could not write the kernel choice to %s: %s", path, err)


def time_routes(hidden: int, intermediate: int) -> dict:
    """route -> best seconds for one pass over a layer's four matmuls, on random fp32 data."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3 * hidden, hidden), (hidden, hidden), (intermediate, hidden), (hidden, intermediate)]
    weights = [torch.randn(*shape, generator=generator) * 0.02 for shape in shapes]    # (out, in)
    biases = [torch.zeros(shape[0]) for shape in shapes]
    inputs = [torch.randn(ROWS, shape[1], generator=generator) for shape in shapes]    # (ROWS, in)
    packed = [onednn_kernels.pack_weight(w) for w in weights]
    passes = {
        "mkl": lambda: [F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases)],
        "onednn": lambda: [onednn_kernels.linear(x, w, b, packed=p) for x, w, b, p in zip(inputs, weights, biases, packed)],
    }
    best = {route: float("inf") for route in ROUTES}
    with torch.inference_mode():
        for route in ROUTES:
            passes[route]()  # warm-up: kernels built, weights touched
        for _ in range(REPEATS):
            for route in ROUTES:  # in turn, so a passing load hits both alike
                start = time.perf_counter()
                passes[route]()
                best[route] = min(best[route], time.perf_counter() - start)
    return best


def pick(seconds: dict) -> str:
    """The faster route; MKL (PyTorch's default) on a tie."""
    return "onednn" if seconds["onednn"] < seconds["mkl"] else "mkl"


@functools.cache
def choose_matmul(hidden: int, intermediate: int) -> MatmulChoice:
    """The fp32 matmul route for a model with these sizes on this machine (measured once, cached).
    Without a working oneDNN operator there is nothing to choose: MKL."""
    key = cache_key(hidden, intermediate)
    if not onednn_kernels.available(torch.empty(0)):
        return MatmulChoice("mkl", {}, key)
    path = cache_file()
    entry = read_cache(path).get(key)
    if entry is not None and all(isinstance(entry["seconds"].get(r), (int, float)) for r in ROUTES):
        choice = MatmulChoice(entry["route"], {r: float(entry["seconds"][r]) for r in ROUTES}, key, cached=True)
    else:
        seconds = time_routes(hidden, intermediate)
        choice = MatmulChoice(pick(seconds), seconds, key)
        entries = read_cache(path)  # re-read: another process may have added its own entries meanwhile
        entries[key] = {"route": choice.route, "seconds": seconds}
        write_cache(path, entries)
    logger.info("fp32 matmuls on this CPU (%s): %s", key, choice.describe())
    return choice


def choice_record(choice: MatmulChoice) -> dict:
    """The choice as plain data, for reports (minibge info, the bench header)."""
    return asdict(choice)
