"""Which kernels the fast path runs on this machine: measured, not assumed.

PyTorch's CPU wheels hold two matmul libraries. An fp32 `F.linear` goes to MKL's sgemm; oneDNN
(onednn.py) is the other. Which one is faster depends on the processor: on some CPUs MKL runs
BERT's shapes at half of oneDNN's rate, on others (Intel ones with MKL's own tuning) it is the
faster of the two (docs/benchmarks.md has both). The same holds for attention: how PyTorch's CPU
softmax vectorises, and what its SDPA kernel costs to set up, depend on the processor's vector
width and caches. A constant chosen on one machine is wrong on the next, so the fast path asks this
file once per model shape, which times the candidate routes on the model's own shapes and keeps
the fastest. Three choices are made this way:

- fp32 matmuls (`choose_matmul`, measured here): MKL (`F.linear`) or oneDNN (prepacked weights).
  Timed on the four matmuls of one encoder layer (H→3H fused QKV, H→H, H→I, I→H) on ROWS packed
  token rows, each route as the fast path runs it.
- short-group attention (encoder.py's `choose_short_attention`): for each band of group lengths in
  encoder.SHORT_BANDS (≤ 15 tokens, 16..SHORT_ATTENTION), SDPA or attention spelled out as three
  ops with the softmax over the last dimension ("plain") or over the keys laid out as rows
  ("transposed"). Timed on a group of sentences of two representative lengths per band, with the
  model's head count and head dimension. Above SHORT_ATTENTION it is always SDPA.
- the CPU attention route for attention="auto" (encoder.py's `choose_attention`): "buckets" or
  "padded", timed on two small packed batches of mixed lengths (short texts in a few
  lengths, longer ones all different), as the length-sorted pipeline makes them.

The rules, the same for all three (`choose`):
- One warm-up pass per route, then the best of REPEATS passes, the routes in turn (so a burst of
  load elsewhere hits them all alike). A route that fails to run counts as infinitely slow.
- The fastest route wins; a tie goes to the route listed first, the simpler or PyTorch's default
  (MKL; SDPA; "buckets"). Within TIE (5%) of the fastest counts as a tie: a route must beat an
  earlier one by more than that to be taken, so a near-equal pair is not decided by noise.
- The answers are cached per machine in `<cache>/kernels.json` (`$MINIBGE_CACHE_DIR`, else
  `$XDG_CACHE_HOME/minibge`, else `~/.cache/minibge`), keyed by the CPU model, torch's version,
  the thread count and the shapes (and, for attention, the dtype), so later processes skip the
  measurement. The file is read as untrusted (anything malformed, or an entry that does not name
  one of today's routes with a time for each, is ignored and measured again) and written to a
  unique temporary name beside it, then renamed, so two processes never leave half a file.
- Only the CPU is measured: on other devices the matmuls take F.linear and attention="auto" takes
  "padded" (docs/benchmarks.md, section 2); other dtypes than fp32 have one matmul route, not
  measured (a bf16 model on the CPU: oneDNN's bf16 products, encoder.py's idea 5; else F.linear).
- A choice measured while other work loaded the machine stays cached: `minibge info --remeasure`
  (forget_machine) deletes this machine's entries and measures again.
- Every route computes the same function (float rounding apart), so which one wins never changes
  the vectors beyond ~1e-7.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..common import check_small_file, read_json_object, write_text_atomic
from . import onednn as onednn_kernels

logger = logging.getLogger(__name__)

ROWS = 256     # packed token rows per timed matmul: a small batch, so the measurement stays short
REPEATS = 3    # timed passes per route, after one warm-up; the best one counts
TIE = 0.05     # a route within this fraction of the fastest ties with it (pick)
ROUTES = ("mkl", "onednn")
MAX_CACHE_BYTES = 1 << 20


@dataclass(frozen=True)
class Choice:
    """The route the fast path takes for one kind of work, and the seconds per pass that chose it."""
    route: str                 # one of `routes`
    seconds: dict              # route -> best seconds for one timed pass
    key: str                   # what the measurement depends on (see machine_key)
    cached: bool = False       # read from the cache file rather than measured in this process
    routes: tuple = ROUTES     # the candidates, in the order a tie is broken
    what: str = "fp32 matmuls"
    unit: str = f"per layer, {ROWS} rows"  # what one timed pass is

    def describe(self) -> str:
        times = ", ".join(f"{route} {self.seconds[route] * 1e3:.2f} ms" for route in self.routes if route in self.seconds)
        return f"{self.route} ({times} {self.unit}{'; cached' if self.cached else ''})"


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key() -> str:
    """What every measurement depends on besides its shapes: the processor, torch, the threads."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cache_key(hidden: int, intermediate: int) -> str:
    return f"{machine_key()} | H={hidden} I={intermediate}"


def cache_file() -> Path:
    root = os.environ.get("MINIBGE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minibge"
    return Path(root) / "kernels.json"


def forget_machine() -> int:
    """Delete this machine's entries (this CPU, torch version and thread count: machine_key) from the
    cache file, so that the next fast encoder measures every choice again, e.g. one made while other
    work loaded the machine (`minibge info --remeasure`). Other machines' entries stay. Returns how
    many entries went."""
    path = cache_file()
    entries = read_cache(path)
    kept = {key: entry for key, entry in entries.items() if not key.startswith(machine_key() + " |")}
    if len(kept) < len(entries):
        write_cache(path, kept)
    return len(entries) - len(kept)


def is_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and value >= 0


def read_cache(path: Path) -> dict:
    """{key: {"route": ..., "seconds": {...}}} from the cache file; {} when missing or malformed, and
    entries that are not of that form left out."""
    try:
        check_small_file(path, MAX_CACHE_BYTES)
        data = read_json_object(path, default={})
    except (OSError, ValueError):
        return {}
    return {key: entry for key, entry in data.items()
            if isinstance(entry, dict) and isinstance(entry.get("route"), str) and isinstance(entry.get("seconds"), dict)
            and all(isinstance(route, str) and is_seconds(s) for route, s in entry["seconds"].items())}


def write_cache(path: Path, entries: dict) -> None:
    """The whole cache, to a unique temporary file beside it, renamed into place; failures only logged
    (a read-only home folder must not stop encoding)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(entries, indent=1, sort_keys=True))
    except OSError as err:
        logger.info("could not write the kernel choice to %s: %s", path, err)


def best_times(passes: dict[str, Callable[[], object]], repeats: int = REPEATS) -> dict:
    """route -> best seconds of `repeats` timed calls of passes[route](), after one warm-up call each;
    the routes take turns. A route that raises (an operator this build or CPU lacks) gets inf."""
    best = {route: float("inf") for route in passes}
    failed = set()
    with torch.inference_mode():
        for route, run in passes.items():
            try:
                run()  # warm-up: kernels built, data touched
            except (RuntimeError, NotImplementedError) as err:
                logger.info("%s cannot run here, not a candidate: %s", route, err)
                failed.add(route)
        for _ in range(repeats):
            for route, run in passes.items():  # in turn, so a passing load hits every route alike
                if route not in failed:
                    start = time.perf_counter()
                    run()
                    best[route] = min(best[route], time.perf_counter() - start)
    return best


def pick(seconds: dict, routes: tuple = ROUTES) -> str:
    """The first of `routes` (in order: the simpler, or PyTorch's default, first) within TIE of the fastest."""
    fastest = min(seconds[route] for route in routes)
    return next(route for route in routes if seconds[route] <= fastest * (1 + TIE))


def choose(what: str, key: str, routes: tuple, measure: Callable[[], dict], unit: str) -> Choice:
    """The route for `key` from the cache file, else measured (measure() -> {route: seconds}) and cached."""
    path = cache_file()
    entry = read_cache(path).get(key)
    if entry is not None and entry["route"] in routes and all(route in entry["seconds"] for route in routes):
        choice = Choice(entry["route"], {r: float(entry["seconds"][r]) for r in routes}, key, True, routes, what, unit)
    else:
        seconds = measure()
        choice = Choice(pick(seconds, routes), seconds, key, False, routes, what, unit)
        entries = read_cache(path)  # re-read: another process may have added its own entries meanwhile
        entries[key] = {"route": choice.route, "seconds": seconds}  # a failed route stays inf (JSON Infinity)
        write_cache(path, entries)
    logger.info("%s on this CPU (%s): %s", what, key, choice.describe())
    return choice


def time_routes(hidden: int, intermediate: int) -> dict:
    """route -> best seconds for one pass over a layer's four matmuls, on random fp32 data."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3 * hidden, hidden), (hidden, hidden), (intermediate, hidden), (hidden, intermediate)]
    weights = [torch.randn(*shape, generator=generator) * 0.02 for shape in shapes]    # (out, in)
    biases = [torch.zeros(shape[0]) for shape in shapes]
    inputs = [torch.randn(ROWS, shape[1], generator=generator) for shape in shapes]    # (ROWS, in)
    packed = [onednn_kernels.pack_weight(w) for w in weights]
    return best_times({
        "mkl": lambda: [F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases)],
        "onednn": lambda: [onednn_kernels.linear(x, w, b, packed=p) for x, w, b, p in zip(inputs, weights, biases, packed)],
    })


@functools.cache
def choose_matmul(hidden: int, intermediate: int) -> Choice:
    """The fp32 matmul route for a model with these sizes on this machine (measured once, cached).
    Without a working oneDNN operator there is nothing to choose: MKL."""
    key = cache_key(hidden, intermediate)
    if not onednn_kernels.available(torch.empty(0)):
        return Choice("mkl", {}, key)
    return choose("fp32 matmuls", key, ROUTES, lambda: time_routes(hidden, intermediate), f"per layer, {ROWS} rows")


def choice_record(choice: Choice) -> dict:
    """The choice as plain data, for reports (minibge info, the bench header)."""
    return asdict(choice)
