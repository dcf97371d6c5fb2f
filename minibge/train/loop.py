"""One training loop for every minibge training stage (contrastive fine-tuning, RetroMAE pre-training).

The loop knows nothing about embeddings or masks. A stage hands it four things:

    model      the nn.Module whose parameters are optimised (and checkpointed)
    loss_fn    batch -> {"loss": scalar to back-propagate, "other": scalars shown on the progress bar}
    batches    a Batches object: deterministic, resumable batches (epoch e, from batch index i)
    save_fn    directory -> writes the stage's artefact there (e.g. a complete embedder folder)

and the loop does the rest, the same way for both stages:

    for each optimizer step:
        for each of `grad_accumulation` micro-batches:
            with autocast (Precision, below):        losses = loss_fn(batch)
            (losses["loss"] / micro-batches).backward()          gradients add up across micro-batches
        all-reduce the gradients (mean over ranks)               what DistributedDataParallel does
        clip the global gradient norm to max_grad_norm
        AdamW step; learning rate: linear warm-up, then linear decay to 0

        lr ▲    ____
           │   /    ‾‾‾‾‾‾‾‾‾‾‾‾---____
           │  /                        ‾‾‾‾----___
           └─┴──────────────────────────────────────▶ step
             warm-up (warmup_ratio of all steps)

Gradient caching (`cache_chunk_size`, gradcache.py): for a loss split at the embeddings (finetune's
contrastive loss), each micro-batch's two lines above become gradcache.cached_step's three passes
(embed every chunk without a graph; the loss and its gradient at the embeddings; re-embed chunk by
chunk with a graph and back-propagate): the same gradient, with one chunk's activations in memory.
That is not what accumulation does: accumulated micro-batches are separate in-batch losses, each
query seeing only its own micro-batch's negatives; a cached batch is one loss over all of them.

Checkpoints (every `save_steps` optimizer steps, and at the end) hold everything a run needs to
continue as if it had never stopped: weights, AdamW moments, the scheduler, every rank's RNG
states and the position in the data (epoch, next batch). That works because the batches are a
pure function of (seed, epoch, batch index, rank): resuming asks `batches.epoch(e, start=i)` and
gets exactly the batches the interrupted run would have seen next.

Every file the loop writes appears whole or not at all (common.atomic_path / atomic_folder): a
checkpoint is built in a temporary folder and renamed into place, and run.json says "finished":
false until the final artefact is complete, so load_embedder refuses a folder whose last save was
cut short (weights.check_training_finished). Before every save, the final one included, the weights
are checked (check_before_saving): every parameter finite, and the loss of the step's last batch,
computed again with the updated weights, finite too; a model that blew up on its last step is
refused, not written, and the last good checkpoint is kept. A checkpoint is read back with
torch.load(weights_only=True) only, so a hostile trainer_state.pt runs no code: the RNG states in it
are tensors and plain lists for that reason.

Data parallelism (torchrun): each rank takes its own slice of every global batch, and after
backward the ranks average their gradients with one all-reduce, so every rank applies the same
update. I do that by hand rather than wrapping the model in DistributedDataParallel because the
loss functions call sub-modules (Embedder.embed calls model(...) directly) and DDP only syncs
when its own forward is called. The arithmetic is DDP's: sum over ranks, divide by world size.
Rank 0 alone writes checkpoints, logs and the progress bar. Backend: nccl on CUDA, gloo on CPU.

Precision (`precision`): fp32, or mixed precision under torch.autocast: bf16 or fp16 on CUDA (fp16
with a GradScaler), and bf16 on a CPU that multiplies it in hardware (AVX-512 BF16 or AMX:
common.cpu_has_native_bf16). Under autocast the master weights, gradients and AdamW moments stay
fp32; autocast casts each matmul's inputs to bf16 on the fly and keeps its weight copies only inside
the `with` block. Elsewhere bf16 would be emulated, slower than fp32, so a CPU without the hardware
refuses it (ValueError, as load_embedder refuses dtype="bfloat16" there); fp16 on the CPU, for which
no CPU has fast kernels, warns and trains in fp32. On the CPU, bf16 autocast keeps PyTorch's own
F.linear (whose bf16 matmuls are oneDNN's kernels, AMX where there is one), not the fp32 oneDNN route
below: autocast casts only at the operators it knows, not inside a custom autograd function, so on
that route every Linear would stay fp32. The loss runs under autocast too, so the score matmul of
InfoNCE is bf16 even after the loss's .float(): its rounding is small next to the encoder's (the
scores move about as much either way), so I keep one context around the whole loss_fn.
docs/benchmarks.md has the speeds and a loss curve of both.

On the CPU in fp32 (`onednn`, on by default), the model's nn.Linears compute through oneDNN for the
length of the loop (fast/onednn.py: the same function, forward and backward, with faster matmuls on
some CPUs; docs/benchmarks.md, "Why oneDNN"). The switch changes the modules' class, not their
parameters, so the optimizer, checkpoints and saved files are the same; it is undone when train()
returns or raises, so the caller gets its model back with plain nn.Linears. Gradient checkpointing
is the model's own flag (BertModel.gradient_checkpointing), set for the length of the loop too.

    from minibge.train import Batches, TrainConfig, train
    config = TrainConfig(epochs=1, batch_size=16, lr=2e-5)
    batches = Batches(examples, collate, config.batch_size, seed=config.seed)
    train(model, loss_fn, batches, config, "runs/out", save_fn=lambda d: minibge.save_pretrained(model, d))
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

# rank_and_world is looked up here at call time, so tests can stand in for a group (monkeypatch this module's name)
from ..common import atomic_folder, rank_and_world, read_json, require_native_bf16, write_text_atomic
from ..fast import onednn as onednn_kernels
from ..weights import RUN_FILE
from . import gradcache

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# RUN_FILE, "run.json" (weights.py): marks a folder as this trainer's output and records what run it is
LOG_FILE = "train_log.jsonl"        # one JSON object per logged step
STATE_FILE = "trainer_state.pt"     # inside checkpoint-N/: everything but the artefact
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    epochs: int = 1                      # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None         # optimizer steps in total; overrides epochs
    batch_size: int = 32                 # examples per micro-batch on each rank
    lr: float = 2e-5                     # peak learning rate (FlagEmbedding: 1e-5 large, 2e-5 base, 3e-5 small)
    weight_decay: float = 0.01           # AdamW's decoupled decay; never on biases or LayerNorm
    warmup_ratio: float = 0.1            # fraction of the steps spent warming the lr up from 0
    grad_accumulation: int = 1           # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0    # clip the global gradient norm (None: no clipping)
    save_steps: int = 0                  # checkpoint every N optimizer steps (0: only at the end)
    seed: int = 42                       # data order, sampling inside batches, dropout
    precision: str = "fp32"              # fp32 | fp16 | bf16 (autocast: CUDA; bf16 also on CPUs with native bf16)
    gradient_checkpointing: bool = False # BertModel.gradient_checkpointing: less memory, one more forward per layer
    onednn: bool = True                  # CPU fp32: Linears through oneDNN (fast/onednn.py): same function, faster
    log_steps: int = 10                  # write a log line every N optimizer steps
    cache_chunk_size: int | None = None  # gradient caching (gradcache.py): embed ≤ N texts at a time; same gradient

    def __post_init__(self):
        positive = ("epochs", "batch_size", "grad_accumulation", "log_steps")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"TrainConfig.max_steps must be None or a positive int, got {self.max_steps!r}")
        if not isinstance(self.save_steps, int) or self.save_steps < 0:
            raise ValueError(f"TrainConfig.save_steps must be an int >= 0, got {self.save_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if not isinstance(self.onednn, bool):
            raise TypeError(f"TrainConfig.onednn must be True or False, got {self.onednn!r}")
        chunk = self.cache_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"TrainConfig.cache_chunk_size must be None or a positive int, got {chunk!r}")
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.precision must be one of {list(AUTOCAST_DTYPES)}, got {self.precision!r}")


# -----------------------------------------------------------------------------
# Data: deterministic, resumable batches

def _generator(*key: int) -> torch.Generator:
    """A torch generator seeded by a tuple of ints (numpy's SeedSequence mixes them well)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


class Batches:
    """Batches of `examples`, a pure function of (seed, epoch, batch index, rank).

    Every epoch shuffles the examples with a generator seeded by (seed, epoch) and cuts them
    into global batches of batch_size × world_size (the incomplete tail is dropped); rank r
    takes rows [r·B, (r+1)·B) of each. `collate(examples, generator)` turns a list of examples
    into a batch; it draws any randomness it needs (negatives, masks) from `generator`, which is
    seeded by (seed, epoch, batch index, rank), so batch i is the same whether the run got
    there directly or resumed at it: `epoch(e, start=i)` skips without collating.
    """

    def __init__(self, examples: Sequence, collate: Callable[[list, torch.Generator], object],
                 batch_size: int, seed: int = 0, shuffle: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.examples = examples
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        return len(self.examples) // (self.batch_size * rank_and_world()[1])

    def epoch(self, epoch: int, start: int = 0) -> Iterator:
        rank, world = rank_and_world()
        if len(self) == 0:
            raise ValueError(f"{len(self.examples)} examples do not fill one batch of {self.batch_size} "
                             f"per rank × {world} rank(s); lower the batch size")
        order = torch.arange(len(self.examples))
        if self.shuffle:
            order = torch.randperm(len(self.examples), generator=_generator(self.seed, epoch))
        global_batch = self.batch_size * world
        for i in range(start, len(self)):
            rows = order[i * global_batch + rank * self.batch_size:][:self.batch_size].tolist()
            yield self.collate([self.examples[j] for j in rows], _generator(self.seed, epoch, i, rank))


def move_to(batch, device: torch.device):
    """Every tensor in a (nested) dict / list / tuple moved to `device`; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


# -----------------------------------------------------------------------------
# Optimizer, schedule, gradient checkpointing, gradient averaging

def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and LayerNorm parameters (1-D) are exempt,
    as in BERT's original recipe and every Hugging Face Trainer run since."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr × step/warmup during warm-up, then down in a straight line to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)  # never exactly 0: the first step already learns a little
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def bert_models(model: nn.Module) -> list:
    """The BertModels inside `model` (itself included), whose flag gradient checkpointing sets."""
    from ..model import BertModel

    models = [module for module in model.modules() if isinstance(module, BertModel)]
    if not models:
        raise ValueError("gradient checkpointing: the model has no BertModel, so no EncoderLayer to recompute")
    return models


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enable: bool):
    """The loop's context: with `enable`, every BertModel inside `model` has its gradient_checkpointing
    flag set while the loop runs, and back as it was afterwards; yields how many models were set.

    It is the model's own flag (honoured in train mode only), not a patched forward, so after
    training encode() still takes the fast path.
    """
    models = bert_models(model) if enable else []
    before = [m.gradient_checkpointing for m in models]
    for m in models:
        m.gradient_checkpointing = True
    try:
        yield len(models)
    finally:
        for m, flag in zip(models, before):
            m.gradient_checkpointing = flag


def average_gradients(model: nn.Module) -> None:
    """All-reduce every gradient and divide by the world size: DDP's averaging, in one flat buffer."""
    _, world = rank_and_world()
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(model: nn.Module) -> None:
    """Start every rank from rank 0's weights (DDP does this when it wraps a model)."""
    if rank_and_world()[1] > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


# -----------------------------------------------------------------------------
# The output folder, checkpoints and RNG states

def _rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain lists: what torch.load(weights_only=True)
    reads back (numpy's own state holds an ndarray, which that loader refuses)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders with a complete trainer state, oldest first."""
    found = [p for p in output_dir.glob(CHECKPOINT_PREFIX + "*")
             if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def prepare_output_dir(output_dir: Path, run_info: dict, resume: bool) -> Path | None:
    """Check that `output_dir` may be written by this run; returns the checkpoint to resume from.

    A fresh run needs a missing or empty folder. --resume needs a folder this trainer wrote for
    the same run (same `run_info`). Anything else is refused: I never overwrite a folder I did not write.
    """
    run_file = output_dir / RUN_FILE
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output {output_dir} exists and is not a folder")
    if not occupied:
        if resume:
            logger.warning("--resume: %s holds no checkpoint yet; starting from step 0", output_dir)
        return None
    if not run_file.exists():
        raise ValueError(f"output folder {output_dir} is not empty and was not written by a minibge training "
                         f"run; choose a new or empty folder (nothing was overwritten)")
    recorded = read_json(run_file)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("run", {}), dict):
        raise ValueError(f"{run_file} is not a minibge run file (expected an object with \"run\" and \"finished\")")
    if not resume:
        raise ValueError(f"output folder {output_dir} already holds a training run; pass --resume to continue "
                         f"it, or choose a new folder")
    if recorded.get("finished"):
        raise ValueError(f"the run in {output_dir} has already finished; nothing to resume")
    found = checkpoints(output_dir)
    if not found:  # nothing to continue, so nothing the settings must agree with
        logger.warning("--resume: %s holds no checkpoint yet; starting from step 0 with these settings", output_dir)
        return None
    before, now = (_what_is_computed(info) for info in (recorded.get("run", {}), run_info))
    _check_same_data(before, now, output_dir)
    differs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differs:
        raise ValueError(f"--resume: {output_dir} is a different run (it differs in {', '.join(differs)}); "
                         f"resume with the same settings, or choose a new folder")
    return found[-1]


DATA_KEY = "train_file_fingerprint"  # run_info's {"bytes", "sha256"} of the training file (common.file_fingerprint)


def _check_same_data(before: dict, now: dict, output_dir: Path) -> None:
    """Refuse to resume on a training file that changed since the run started (same path, other
    lines: the batches after the checkpoint would not be the ones the run was going to see).
    A run recorded before fingerprints were kept is resumed with a warning."""
    if DATA_KEY not in now:
        return
    if DATA_KEY not in before:
        logger.warning("--resume: %s records no fingerprint of its training file (an older minibge); "
                       "cannot check that %s is unchanged", output_dir, now.get("train_file"))
        before[DATA_KEY] = now[DATA_KEY]
        return
    then, today = before[DATA_KEY], now[DATA_KEY]
    if then != today:
        def describe(f):
            return (f"{f.get('bytes', 0):,} bytes, sha256 {str(f.get('sha256'))[:16]}…" if isinstance(f, dict)
                    else repr(f))
        raise ValueError(f"--resume: the training file {now.get('train_file')} has changed since the run in "
                         f"{output_dir} started ({describe(then)} then, {describe(today)} now); resume with the "
                         f"original file, or start a new run in a new folder")


# TrainConfig fields that change how a step is computed, not what: a run may be resumed with them
# changed (say, gradient checkpointing turned on after running out of memory), and a run recorded
# before one of them existed may be resumed too.
HOW_NOT_WHAT = ("onednn", "gradient_checkpointing", "cache_chunk_size")


def _what_is_computed(run_info: dict) -> dict:
    """run_info without the HOW_NOT_WHAT settings in its "config" (vars(TrainConfig), see finetune.py)."""
    config = run_info.get("config")
    if not isinstance(config, dict):
        return run_info
    return {**run_info, "config": {k: v for k, v in config.items() if k not in HOW_NOT_WHAT}}


def _write_run_file(output_dir: Path, run_info: dict, finished: bool) -> None:
    write_text_atomic(output_dir / RUN_FILE, json.dumps({"run": run_info, "finished": finished}, indent=2) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step`: after a resume they will be written again. A line that is not
    a log entry (a crash cut it short) goes too."""
    if path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def check_before_saving(model: nn.Module, loss_fn: Callable, batch, device: torch.device, precision: str,
                        step: int) -> None:
    """Refuse to save weights that have blown up: FloatingPointError unless every parameter is
    finite and the loss of `batch` (the step's last micro-batch), computed again with the updated
    weights, is finite too. The second test catches what the first cannot: an lr so large that one
    AdamW step makes the weights huge (~1e9) yet finite, and every forward pass NaN.

    The probe runs in eval mode, without gradients, with the RNG states put back afterwards, so
    that checking changes nothing a later step computes. Every rank calls this (loss_fn may gather
    across ranks), and the ranks agree: if one finds a problem, all raise.
    """
    problem = next((f"parameter {name} holds NaN or inf" for name, param in model.named_parameters()
                    if not torch.isfinite(param).all()), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                _autocast(device, precision):
            loss = float(loss_fn(move_to(batch, device))["loss"])
    finally:
        model.train(was_training)
    if problem is None and not math.isfinite(loss):
        problem = f"the loss of the last batch, with the updated weights, is {loss}"
    _, world = rank_and_world()
    flag = torch.tensor([float(problem is not None)], device=device)
    if world > 1:
        dist.all_reduce(flag)
    if flag.item():
        raise FloatingPointError(f"step {step}: {problem or 'another rank found the updated weights broken'}; "
                                 f"the model blew up and was not saved (lower the lr; the last good checkpoint, "
                                 f"if any, is kept)")


def save_checkpoint(output_dir: Path, step: int, position: tuple[int, int], model: nn.Module, optimizer,
                    scheduler, scaler, save_fn: Callable | None, config: TrainConfig) -> None:
    """checkpoint-<step>/: the trainer state (+ the stage's artefact); older checkpoints are removed.

    Every rank calls this (the RNG states are gathered from all of them); rank 0 writes, into a
    temporary folder renamed into place at the end: a crash never leaves half a checkpoint.
    """
    rank, world = rank_and_world()
    rng_states = [None] * world
    if world > 1:
        dist.all_gather_object(rng_states, _rng_state())
    else:
        rng_states = [_rng_state()]
    if rank == 0:
        final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        with atomic_folder(final) as partial:
            torch.save({"step": step, "position": list(position), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_states, "world_size": world, "config": asdict(config)}, partial / STATE_FILE)
            if save_fn is not None:
                save_fn(partial)
        for old in checkpoints(output_dir)[:-1]:
            shutil.rmtree(old)
        logger.info("saved %s", final)
    if world > 1:
        dist.barrier()


# What a trainer_state.pt must hold, and of which type, before anything is restored from it
STATE_FIELDS = {"step": int, "position": (list, tuple), "model": dict, "optimizer": dict, "scheduler": dict,
                "rng": list, "world_size": int}


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler) -> tuple[int, tuple[int, int]]:
    """Restore everything save_checkpoint wrote; returns (step, (epoch, next batch)).

    The file is untrusted (a run folder may come from a shared disk or a download): it is read with
    torch.load(weights_only=True), which builds tensors and plain containers and calls nothing
    else, and any way it can be broken (truncated, corrupted, another file, a checkpoint from a
    minibge that pickled numpy arrays) is a ValueError naming the file."""
    rank, world = rank_and_world()
    file = path / STATE_FILE

    def broken(problem: str) -> ValueError:
        return ValueError(f"cannot resume from {file}: {problem}; start a new run (or resume from an intact "
                          f"checkpoint)")

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused something: say what, not torch's advice to disable it
        wanted = re.search(r"(?i)unsupported (?:global: )?GLOBAL (\S+)", str(err))
        raise broken(f"it asks to build {wanted.group(1) if wanted else 'an object'}, which is not a tensor or a "
                     f"plain value, so it was not loaded (a hostile file, or a checkpoint from a minibge that "
                     f"pickled numpy arrays)") from None
    except Exception as err:  # torch raises many types for a damaged file
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise broken(f"not a readable minibge checkpoint ({first_line})") from None
    if not isinstance(state, dict):
        raise broken(f"it holds a {type(state).__name__}, not a trainer state")
    for field, kind in STATE_FIELDS.items():
        if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool):
            raise broken(f"field {field!r} is missing or not a {getattr(kind, '__name__', 'list')}")
    if state["world_size"] != world:
        raise ValueError(f"{path} was written by {state['world_size']} rank(s); resume it with the same number "
                         f"(now {world}), or the data order would change")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][rank])
        epoch, next_batch = (int(x) for x in state["position"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise broken(f"it does not fit this run ({first_line})") from None
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state["step"], (epoch, next_batch)


# -----------------------------------------------------------------------------
# The loop

def onednn_while_training(model: nn.Module, config: TrainConfig):
    """The loop's context: the model's nn.Linears on oneDNN while it runs, when config.onednn asks for
    it, the parameters are fp32 on a CPU with a working operator and no autocast is on; otherwise
    nothing changes (under bf16 autocast the Linears stay F.linear, which autocast casts to bf16)."""
    param = next(model.parameters())
    if not (config.onednn and onednn_kernels.available(param)) or autocast_dtype(param.device, config.precision):
        return contextlib.nullcontext(0)
    return onednn_kernels.onednn_linears(model)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype the loop autocasts to on `device`, or None (fp32): bf16/fp16 on CUDA, bf16 on the CPU
    (train() has refused it on a CPU without native bf16), nothing elsewhere (train() warns)."""
    dtype = AUTOCAST_DTYPES[precision]
    if device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16):
        return dtype
    return None


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse bf16 on a CPU that would emulate it (ValueError); warn that fp16 off CUDA trains in fp32."""
    if precision == "bf16":
        require_native_bf16(device, "precision bf16")
    if precision != "fp32" and autocast_dtype(device, precision) is None:
        logger.warning("precision %s needs CUDA%s; training in fp32 on %s", precision,
                       " (or bf16 on a CPU with native bf16)" if precision == "fp16" else "", device)


def _autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _as_floats(losses: dict) -> dict:
    return {name: float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            for name, value in losses.items()}


def agree_on_output_dir(output_dir: Path, run_info: dict, resume: bool) -> Path | None:
    """Rank 0 checks the output folder (prepare_output_dir) and every rank learns its verdict, so a
    refusal stops every rank rather than leaving the others hanging in a collective. Returns the
    checkpoint to resume from, or None."""
    rank, world = rank_and_world()
    verdict = [None, None]  # (checkpoint to resume from, error message)
    if rank == 0:
        try:
            verdict[0] = prepare_output_dir(output_dir, run_info, resume)
        except ValueError as err:
            verdict[1] = str(err)
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    resume_from, refusal = verdict
    if refusal:
        raise ValueError(refusal)
    return resume_from


def seed_everything(seed: int) -> None:
    """torch, Python and numpy from one seed (train() adds the rank: dropout differs across ranks)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def resume_or_start(resume_from: Path | None, output_dir: Path, run_info: dict, model: nn.Module, optimizer,
                    scheduler, scaler) -> tuple[int, tuple[int, int]]:
    """(step, (epoch, next batch)) to start from: a checkpoint's, or the beginning. Rank 0 marks the
    folder as this run's (run.json) and drops log lines the resumed run will write again."""
    step, position = 0, (0, 0)
    if resume_from is not None:
        step, position = load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
    if rank_and_world()[0] == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_run_file(output_dir, run_info, finished=False)
        _truncate_log(output_dir / LOG_FILE, step)
    return step, position


def step_groups(batches: Batches, epoch: int, next_batch: int, grad_accumulation: int) -> Iterator:
    """(the micro-batches of one optimizer step, (epoch, next batch) after them), from a position on,
    forever: up to grad_accumulation micro-batches a step, never across an epoch boundary."""
    group = []
    while True:
        for batch in batches.epoch(epoch, start=next_batch):
            next_batch += 1
            group.append(batch)
            if len(group) == grad_accumulation or next_batch == len(batches):
                yield group, ((epoch, next_batch) if next_batch < len(batches) else (epoch + 1, 0))
                group = []
        epoch, next_batch = epoch + 1, 0


def accumulate_gradients(loss_fn: Callable, group: list, device: torch.device, precision: str, scaler,
                         step: int, cache_chunk_size: int | None = None) -> dict:
    """Backward through every micro-batch of a step; returns the step's losses (means over the group).
    With cache_chunk_size, each micro-batch's gradient comes from gradcache.cached_step."""
    def backward(loss: torch.Tensor) -> None:
        loss = loss / len(group)  # the step's gradient is the mean over its micro-batches
        (scaler.scale(loss) if scaler is not None else loss).backward()

    step_losses = {}
    for batch in group:
        if cache_chunk_size:
            losses = gradcache.cached_step(loss_fn, move_to(batch, device), cache_chunk_size, backward,
                                           autocast=lambda: _autocast(device, precision))
        else:
            with _autocast(device, precision):
                losses = loss_fn(move_to(batch, device))
            if "loss" not in losses:
                raise ValueError(f"loss_fn must return a dict with a 'loss' entry, got keys {sorted(losses)}")
            backward(losses["loss"])
        for name, value in _as_floats(losses).items():
            step_losses[name] = step_losses.get(name, 0.0) + value / len(group)
    if not math.isfinite(step_losses["loss"]):
        raise FloatingPointError(f"step {step + 1}: the loss is {step_losses['loss']}; lower the lr "
                                 "or check the data (fp16 overflow? try bf16)")
    return step_losses


def optimizer_step(model: nn.Module, optimizer, scheduler, scaler, max_grad_norm: float | None) -> tuple:
    """Average the gradients over ranks, clip, step AdamW and the schedule, clear the gradients.
    Returns (the learning rate this step used, the gradient norm before clipping or None)."""
    average_gradients(model)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


class TrainLog:
    """The losses of the steps since the last log line; every log_steps steps (and at the last one)
    their means, the lr, throughput and gradient norm go to train_log.jsonl (rank 0) and the bar."""

    def __init__(self, output_dir: Path, config: TrainConfig, total_steps: int, bar):
        _, world = rank_and_world()
        self.path, self.bar, self.log_steps, self.total_steps = output_dir / LOG_FILE, bar, config.log_steps, total_steps
        self.examples_per_step = config.batch_size * config.grad_accumulation * world
        self.window, self.window_start, self.logged = [], time.perf_counter(), {}

    def add(self, step: int, epoch: int, lr: float, grad_norm: float | None, step_losses: dict) -> None:
        self.window.append(step_losses)
        if step % self.log_steps != 0 and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self.window_start
        logged = {name: sum(w[name] for w in self.window) / len(self.window) for name in self.window[0]}
        logged.update(step=step, epoch=epoch, lr=lr,
                      examples_per_s=len(self.window) * self.examples_per_step / elapsed)
        if grad_norm is not None:
            logged["grad_norm"] = grad_norm
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items() if k not in ("step", "epoch")})
        if rank_and_world()[0] == 0:
            with open(self.path, "a", encoding="utf-8") as log:
                log.write(json.dumps(logged) + "\n")
        self.window, self.window_start, self.logged = [], time.perf_counter(), logged


def save_final(output_dir: Path, run_info: dict, save_fn: Callable | None, step: int) -> None:
    """Rank 0 writes the artefact (built in a temporary folder, then moved in file by file), marks
    the run finished and only then deletes the checkpoints; all ranks wait. Until run.json says
    finished, load_embedder refuses the folder, and --resume still has the last checkpoint."""
    rank, world = rank_and_world()
    if rank == 0:
        if save_fn is not None:
            with atomic_folder(output_dir) as partial:
                save_fn(partial)
        _write_run_file(output_dir, run_info, finished=True)
        for old in checkpoints(output_dir):
            shutil.rmtree(old)
        logger.info("training done: %d steps; wrote %s", step, output_dir)
    if world > 1:
        dist.barrier()


def train(model: nn.Module, loss_fn: Callable[[object], dict], batches: Batches, config: TrainConfig,
          output_dir, save_fn: Callable[[Path], object] | None = None, resume: bool = False,
          run_info: dict | None = None, device: torch.device | None = None) -> dict:
    """Optimise `model` on `batches` with `loss_fn`; see the module docstring.

    output_dir receives checkpoint-N/ folders while training and, at the end, the artefact
    `save_fn(output_dir)` writes (checkpoints are then deleted). run_info (any JSON-able dict,
    e.g. the command-line settings) is recorded in run.json; --resume refuses a folder whose
    run_info differs. Returns the last logged metrics.
    """
    output_dir = Path(output_dir)
    run_info = json.loads(json.dumps(run_info or {}))  # what run.json will read back (tuples -> lists)
    rank, _ = rank_and_world()
    device = device or next(model.parameters()).device
    check_precision(device, config.precision)  # before the output folder is touched
    if config.gradient_checkpointing:
        bert_models(model)  # a model it cannot apply to fails here, before the output folder is touched
    if config.cache_chunk_size and not isinstance(loss_fn, gradcache.EmbeddingLoss):
        raise ValueError("cache_chunk_size needs a loss split at the embeddings (gradcache.EmbeddingLoss, as "
                         "finetune's); this loss is not, and a per-text loss needs no caching: use grad_accumulation")
    resume_from = agree_on_output_dir(output_dir, run_info, resume)

    total_steps = config.max_steps or config.epochs * math.ceil(len(batches) / config.grad_accumulation)
    seed_everything(config.seed + rank)  # dropout differs across ranks, as with independent GPUs
    broadcast_parameters(model)
    optimizer = build_optimizer(model, config)
    scheduler = linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" and device.type == "cuda" else None
    step, (epoch, next_batch) = resume_or_start(resume_from, output_dir, run_info, model, optimizer, scheduler, scaler)
    start_step = step

    model.train()
    groups = step_groups(batches, epoch, next_batch, config.grad_accumulation)
    with onednn_while_training(model, config) as switched, \
            gradient_checkpointing(model, config.gradient_checkpointing):  # both undone when the loop ends or raises
        if switched and rank == 0:
            logger.info("%d Linear layers compute through oneDNN while training (CPU, fp32; off: --no-onednn, "
                        "TrainConfig(onednn=False))", switched)
        if device.type == "cpu" and autocast_dtype(device, config.precision) and rank == 0:
            logger.info("training under bf16 autocast on the CPU (fp32 master weights and AdamW state); the "
                        "Linears run PyTorch's own bf16 matmuls, not the fp32 oneDNN route")
        from tqdm.auto import tqdm  # the bar comes after that line: a log line drawn over a bar is hard to find
        bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=rank != 0)
        log = TrainLog(output_dir, config, total_steps, bar)
        try:  # the bar is closed whether the loop ends or raises: an error is then the last line on stderr
            while step < total_steps:
                group, position = next(groups)
                step_losses = accumulate_gradients(loss_fn, group, device, config.precision, scaler, step,
                                                   config.cache_chunk_size)
                lr, grad_norm = optimizer_step(model, optimizer, scheduler, scaler, config.max_grad_norm)
                step += 1
                bar.update(1)
                log.add(step, position[0], lr, grad_norm, step_losses)
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    check_before_saving(model, loss_fn, group[-1], device, config.precision, step)
                    save_checkpoint(output_dir, step, position, model, optimizer, scheduler, scaler, save_fn, config)
            if step > start_step:  # the final save's check; a run resumed at its end has nothing new to check
                check_before_saving(model, loss_fn, group[-1], device, config.precision, step)
        finally:
            bar.close()

    model.eval()
    save_final(output_dir, run_info, save_fn, step)
    return log.logged
