"""The command line's shared parts: the parser class, its help formatter and the argument types
that several command groups use (each group's own types live in its module)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import hub
from ..embedder import BATCH_SIZE, MAX_TOKENS
from ..evaluate import task_key
from ..evaluate.search import RERANK_BATCH_SIZE
from .io import UsageError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "eval" / "data"


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line is one line on stderr, not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example lines as written; wraps the description."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


# ---------------------------------------------------------------- argument types
def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def max_length(value: str) -> int:
    number = positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError("must be at least 2 (room for [CLS] and [SEP])")
    return number


def device(value: str) -> str:
    try:
        torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; try cpu, cuda, cuda:1 or mps") from None
    return value


def hub_id(value: str) -> str:
    try:
        hub.check_hub_id(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def task(value: str) -> str:
    try:
        return task_key(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- the parser
def batch_size_option(p) -> None:
    """--batch-size for the commands that embed texts: encode's default and its token budget."""
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help=f"texts per forward pass at most; a batch also stops at {MAX_TOKENS:,} tokens (default: {BATCH_SIZE})")


def rerank_options(p, items: str) -> None:
    """--rerank and its options, for the commands that retrieve then rerank (search, eval)."""
    p.add_argument("--rerank", metavar="PATH_OR_ID",
                   help=f"a cross-encoder: re-order each query's --rerank-top best {items} by its score")
    p.add_argument("--rerank-top", type=positive_int, default=100, help=f"{items} reranked per query (default: 100)")
    p.add_argument("--rerank-max-length", type=positive_int, default=None,
                   help="tokens per (query, passage) pair for the reranker (default: its tokenizer's model_max_length)")
    p.add_argument("--rerank-batch-size", type=positive_int, default=RERANK_BATCH_SIZE,
                   help=f"(query, passage) pairs per reranker forward pass (default: {RERANK_BATCH_SIZE})")


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)



