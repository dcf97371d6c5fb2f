"""Small helpers that several parts of minibge share, each written once: reading JSON side files,
reading text/jsonl(.gz) lines, and where this process stands in a torchrun group.
"""
from __future__ import annotations

import datetime
import gzip
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def read_json(path: Path, default=None):
    """The parsed JSON file at `path`, or `default` when there is no such file.

    A model folder's side files (modules.json, tokenizer_config.json, ...) are optional, so a missing
    one is not an error; a present one that does not parse is (json.JSONDecodeError, a ValueError).
    """
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


# -----------------------------------------------------------------------------
# Reading lines: the one reader behind the CLI's inputs, the evaluation sets and the training files

class LineError(ValueError):
    """A line that cannot be read, phrased "<name> line <n>: <problem>"; .name, .number, .problem."""

    def __init__(self, name: str, number: int, problem: str):
        super().__init__(f"{name} line {number}: {problem}")
        self.name, self.number, self.problem = name, number, problem


def iter_lines(path, name: str | None = None, skip_blank: bool = False,
               on_error: Callable[[LineError], None] | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a UTF-8 file; `path` "-" reads stdin, a ".gz"
    suffix is gunzipped. `name` is what errors call the file (default: the path, or "stdin").

    Exact choices, each for a reason:
    - I read bytes, so that a decoding error can name its line and byte.
    - Lines end at "\\n" only, and one trailing "\\r" is dropped: a CRLF file (SICK's) reads like an
      LF file, and a stray "\\r" or a Unicode line separator inside a line never splits it in two.
    - A byte-order mark at the start of line 1 is not part of the text.
    - skip_blank: lines that are empty or whitespace only are left out (their numbers still count).
    - A line that is not UTF-8 raises LineError, or, given on_error, is handed to it and skipped.
    """
    if str(path) == "-":
        # A text stream with no bytes underneath (e.g. io.StringIO in tests) is encoded back.
        lines = getattr(sys.stdin, "buffer", None)
        if lines is None:
            lines = (line.encode("utf-8") for line in sys.stdin)
        yield from _decode_lines(lines, name or "stdin", skip_blank, on_error)
        return
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rb") as stream:
        yield from _decode_lines(stream, name or str(path), skip_blank, on_error)


def _decode_lines(lines: Iterable[bytes], name: str, skip_blank: bool,
                  on_error: Callable[[LineError], None] | None) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            error = LineError(name, number, f"not valid UTF-8 ({e.reason} at byte {e.start})")
            if on_error is None:
                raise error from None
            on_error(error)
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if skip_blank and not text.strip():
            continue
        yield number, text


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last one shorter): how a stream is embedded a chunk at a time."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK in the environment

def setup_distributed(timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the torchrun process group if there is one (idempotent); returns this rank's device.

    Without torchrun this is a no-op and the device is CUDA when available, else the CPU. timeout:
    how long a collective waits for the other ranks (None: torch.distributed's default); it only
    applies when this call creates the group. Backend: nccl on CUDA, gloo on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, **({} if timeout is None else {"timeout": timeout}))
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of ranks): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, the one that writes files, logs and draws progress bars."""
    return rank_and_world()[0] == 0
