"""`minibge encode` under torchrun: every rank embeds one slice of the texts, rank 0 joins them.

    torchrun --standalone --nproc_per_node 4 -m minibge encode --input big.txt --output vectors.npy

cli/embed.py's cmd_encode comes here when WORLD_SIZE > 1. With N texts and W ranks, rank r takes the
contiguous slice [start_r, stop_r); the first N mod W ranks get one text more than the others
(numpy.array_split's rule), so the slices in rank order are the input in input order:

    texts   0 1 2 3 4 5 6          (N = 7, W = 2)
    rank 0  0 1 2 3                -> .vectors.npy.<run>.rank0-of-2.partial
    rank 1          4 5 6          -> .vectors.npy.<run>.rank1-of-2.partial
    rank 0 joins the parts, in rank order, into vectors.npy

Each rank streams its rows into its part file beside the output, 10,000 texts at a time, as one
process does; nothing is gathered into memory, so memory stays as flat as in one process. <run>
is a random number rank 0 draws and the ranks agree on first, so two sharded runs writing the same
output never write into each other's parts. Then rank 0 writes the output from the parts with a
plain byte copy (cli/io.py join_parts), into a unique temporary name renamed at the end
(common.atomic_path), and deletes the parts. The output folder must therefore be one that every
rank can see (always true on one machine).

The ranks talk once per step, and only to agree: after each step that can fail on one rank alone
(loading the model, embedding a slice, joining the parts), every rank says in one small
all-reduce whether its step worked. If any rank failed, every rank stops: the one that failed
reports its own error, the others say which rank failed, and no output is written (an existing
output is left as it was). A rank killed outright (SIGKILL, a crash) cannot say so; the others
then see a broken connection in the all-reduce and stop too, or torchrun stops them.

Devices: the process group is common.setup_distributed's (gloo on CPU, nccl on CUDA, with rank r
on cuda:LOCAL_RANK). Only rank 0 prints which model it loaded, shows a progress bar and logs.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .io import (CHUNK_TEXTS, ChunkEmbedder, CliError, chunked, encode_source, join_parts, new_run_number, one_line,
                 part_paths, progress, query_prefix, warn_blank, write_part)
from .model import load
from ..common import rank_and_world, setup_distributed

T = TypeVar("T")

logger = logging.getLogger(__name__)


def slice_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s texts out of `total`: contiguous, the first total % world
    ranks one text longer; a rank may get none (fewer texts than ranks)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    size, longer = divmod(total, world)
    start = rank * size + min(rank, longer)
    return start, start + size + (rank < longer)


# The ranks meet only after long pieces of work: rank 0 downloading the model while the others wait,
# and each rank's slice of a large file. torch.distributed's default timeout (30 minutes on gloo)
# would end a job that is merely slow. A rank that dies is noticed at once anyway (its connection
# breaks, and torchrun stops the others), so a long wait only lets slow ranks finish.
SYNC_TIMEOUT = datetime.timedelta(hours=24)


class Ranks:
    """This process's place in the torchrun group, and the one thing the ranks say to each other."""

    def __init__(self):
        self.device = setup_distributed(SYNC_TIMEOUT)  # joins the group; cuda:LOCAL_RANK with CUDA, else the CPU
        self.rank, self.world = rank_and_world()

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum of `values` over all ranks (a collective: every rank must call it)."""
        # nccl reduces CUDA tensors only, gloo CPU ones: the group's own device suits both
        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        try:
            dist.all_reduce(tensor)
        except RuntimeError as e:  # a rank died without a word (killed, crashed): its connection broke
            raise CliError(f"rank {self.rank}: lost contact with the other ranks ({one_line(e)})") from None
        return tensor.tolist()

    def step(self, what: str, work: Callable[[], T]) -> T:
        """Run work() on this rank, then learn whether it worked on every rank; if it failed on
        any, raise on every rank (the failed one with its own error), so that all stop together."""
        failed = [0] * self.world
        try:
            result = work()
        except Exception:
            failed[self.rank] = 1
            with contextlib.suppress(CliError):  # my own error is the one worth reporting
                self.sum(failed)
            raise
        failed = [rank for rank, flag in enumerate(self.sum(failed)) if flag]
        if failed:
            ranks = ", ".join(map(str, failed))
            raise CliError(f"{what} failed on rank {ranks} (see its error); no output was written")
        return result


def encode_sharded(args, output: Path) -> int:
    """`minibge encode --output FILE` as one rank of a torchrun group; cmd_encode checked the arguments."""
    total, lines = encode_source(args, args.input)  # every rank reads the input: it must see the same file
    created = not dist.is_initialized()
    ranks = Ranks()
    package_logger = logging.getLogger("minibge")
    old_level = package_logger.level
    if ranks.rank != 0:  # one log, not one per rank; errors still reach stderr from every rank
        package_logger.setLevel(logging.ERROR)
    try:
        _encode_slice_and_join(args, output, total, lines, ranks)
    finally:
        package_logger.setLevel(old_level)
        if created:
            dist.destroy_process_group()
    return 0


def _encode_slice_and_join(args, output: Path, total: int, lines, ranks: Ranks) -> None:
    rank, world = ranks.rank, ranks.world
    # The ranks count the lines each on its own; if the file changed in between, the slices would
    # overlap or leave a gap, so I check that they all counted the same.
    if ranks.sum([total])[0] != total * world:
        raise CliError(f"the ranks counted different numbers of lines in --input {args.input}; "
                       f"did it change while they read it?")
    args = copy.copy(args)
    if ranks.device.type == "cuda" and args.device in (None, "cuda"):
        args.device = str(ranks.device)  # one GPU per rank: cuda:LOCAL_RANK

    def load_model():
        return load(args, query_instruction=args.instruction, announce=rank == 0)[0]

    # Rank 0 loads first and the others after it: a Hub id is then downloaded once, by rank 0,
    # not by every rank at the same time into the same folder.
    first = ranks.step("loading the model", load_model if rank == 0 else lambda: None)
    embedder = ranks.step("loading the model", (lambda: first) if rank == 0 else load_model)
    prefix = query_prefix(args, embedder)

    start, stop = slice_bounds(total, rank, world)
    run = ranks.sum([new_run_number() if rank == 0 else 0])[0]  # rank 0's number, known to every rank
    parts = part_paths(output, world, run)
    logger.info("%d texts over %d ranks: rank 0 embeds lines %d-%d", total, world, start + 1, stop)

    def embed_slice() -> int:
        # rank 0's bar counts its own slice, which is within one text of every other rank's
        with progress(stop - start if rank == 0 else None, "text") as bar:
            embed = ChunkEmbedder(args, embedder, prefix, bar)
            count = write_part(parts[rank], output, chunked(itertools.islice(lines, start, stop), CHUNK_TEXTS), embed)
        if count != stop - start:  # (the part is deleted below, as after any failure)
            raise CliError(f"the input changed while it was read (rank {rank} expected lines "
                           f"{start + 1}-{stop}, the file ended after {start + count})")
        return embed.blank

    try:
        blank = ranks.step("embedding a slice", embed_slice)
    except BaseException:  # here or on another rank: no one will join the parts, so they go
        # Each rank deletes its own part; rank 0 deletes them all, for a rank that was killed
        # outright and could not (a rank still writing keeps its open file until it stops).
        for part in parts if rank == 0 else [parts[rank]]:
            part.unlink(missing_ok=True)
        raise
    blank = ranks.sum([blank])[0]

    def join() -> None:
        if rank != 0:
            return
        try:  # from here on the parts are rank 0's: it deletes them all, whether joining works or not
            join_parts(output, [(parts[r], _rows(total, r, world)) for r in range(world)], embedder.dimension)
        finally:
            for part in parts:
                part.unlink(missing_ok=True)

    ranks.step("writing the output", join)
    warn_blank(blank)  # logged by rank 0 only


def _rows(total: int, rank: int, world: int) -> int:
    start, stop = slice_bounds(total, rank, world)
    return stop - start
