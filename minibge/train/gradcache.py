"""Gradient caching (GradCache): the gradient of one huge contrastive batch with the memory of a small chunk.

An in-batch contrastive loss couples every text of the batch: each query's softmax runs over every
passage, so the batch cannot be cut into micro-batches without changing the loss (fewer negatives),
and a plain step keeps the activations of all B + B·G encodings until backward: memory grows with
the batch. Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup") starts from the chain rule. The loss sees the encoder only through the
embeddings e_t of the batch's texts t, so

    ∂L/∂θ = Σ_t (∂L/∂e_t) · (∂e_t/∂θ)

and the first factor needs only the embeddings (a few kB per text), the second only text t's own
forward pass. A cached step is three passes over the batch:

    1. embed     every chunk of ≤ C texts without a graph (no_grad), noting the RNG state before each
    2. loss      on the whole batch's embeddings: the full (B, B·G) score matrix, cross-device negatives
                 and distillation included; backward stops at the embeddings: ∂L/∂e for every text
    3. re-embed  chunk by chunk with a graph, from the chunk's noted RNG state, and back-propagate its
                 cached ∂L/∂e into the weights; the chunks' gradients add up in .grad

Memory: one chunk's activations, plus the embeddings and the score matrix (B × B·G floats), whatever
the batch size. Time: one more forward pass per text than a plain step (docs/benchmarks.md).

My choices:
- Dropout must be the same in 1 and 3, or the cached ∂L/∂e belong to other activations than the ones
  step 3 differentiates. I note the CPU generator's state (and the GPU's, when the batch is on one)
  before each chunk in 1 and restore it for that chunk in 3, as GradCache's RandContext does. After
  3 the generators continue from where 2 left them: 3 draws nothing new.
- Chunks are row slices of the collated batch, padding included: each chunk computes exactly the
  rows it would have computed in the full batch (trimming each chunk's padding would be faster,
  and would change the result by float rounding).
- The loss's backward in 2 is the loop's (`backward`): it divides by the micro-batches of an
  accumulation step and applies fp16's loss scale, so the cached gradients arrive scaled and pass
  through 3 unchanged. Cross-device negatives need nothing extra: losses.gather_across_ranks gathers
  the cached embeddings and puts the local slice back with its ×W factor, so ∂L/∂e is this rank's
  share, ready to be pushed into this rank's encoder.
- Gradient checkpointing (BertModel.gradient_checkpointing) acts inside 3, where a graph exists:
  it cuts one chunk's activations to the layers' inputs, at one more forward per layer.

A loss is cacheable when it is split at the embeddings: an EmbeddingLoss (below). finetune.py's
ContrastiveStep is one; RetroMAE's loss (pretrain.py) is per text, where accumulation is already exact.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


class EmbeddingLoss:
    """A loss that sees the model only through embeddings of the batch's texts, split there.

        inputs(batch)            {name: the rows to embed} (a tensor, or a dict of tensors with equal rows)
        embed(rows)              those rows → embeddings (n, D), with a graph when grad is enabled
        loss(embeddings, batch)  {name: (n, D)} → {"loss": scalar, other scalars...}

    Called on a batch, it is the plain step: embed everything, then the loss.
    """

    def inputs(self, batch) -> dict:
        raise NotImplementedError

    def embed(self, rows) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, embeddings: dict, batch) -> dict:
        raise NotImplementedError

    def __call__(self, batch) -> dict:
        return self.loss({name: self.embed(rows) for name, rows in self.inputs(batch).items()}, batch)


class RandomState:
    """The generators dropout draws from, noted now and restorable later (GradCache's RandContext):
    the CPU's, and the GPU's when `device` is one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _row_count(rows) -> int:
    return rows.shape[0] if isinstance(rows, torch.Tensor) else _row_count(next(iter(rows.values())))


def _device(rows) -> torch.device:
    return rows.device if isinstance(rows, torch.Tensor) else _device(next(iter(rows.values())))


def _slice(rows, start: int, stop: int):
    if isinstance(rows, torch.Tensor):
        return rows[start:stop]
    return {key: _slice(value, start, stop) for key, value in rows.items()}


def chunks(rows, size: int) -> list:
    """Rows [0, size), [size, 2·size), ... of a tensor or a tokenized batch (every tensor cut the same way)."""
    n = _row_count(rows)
    return [_slice(rows, start, start + size) for start in range(0, n, size)]


def cached_step(loss_fn: EmbeddingLoss, batch, chunk_size: int, backward: Callable[[torch.Tensor], None],
                autocast: Callable = contextlib.nullcontext) -> dict:
    """One micro-batch's gradient, accumulated into .grad, with the memory of `chunk_size` texts; the losses.

    backward(loss) back-propagates a loss (the loop's: divided by the micro-batches, fp16-scaled);
    autocast() opens the loop's autocast context around every forward.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    rows = loss_fn.inputs(batch)
    inputs = {name: chunks(texts, chunk_size) for name, texts in rows.items()}
    device = _device(next(iter(rows.values())))

    # 1. embed: every chunk without a graph, noting the RNG state it starts from
    states, embeddings = {}, {}
    with torch.no_grad():
        for name, parts in inputs.items():
            states[name], pieces = [], []
            for part in parts:
                states[name].append(RandomState(device))
                with autocast():
                    pieces.append(loss_fn.embed(part))                          # (≤ C, D)
            embeddings[name] = torch.cat(pieces).requires_grad_()               # (n, D): a leaf that collects ∂L/∂e

    # 2. loss: on the whole batch at once; backward stops at the embeddings
    with autocast():
        losses = loss_fn.loss(embeddings, batch)
    if "loss" not in losses:
        raise ValueError(f"loss_fn must return a dict with a 'loss' entry, got keys {sorted(losses)}")
    backward(losses["loss"])
    after_loss = RandomState(device)

    # 3. re-embed: chunk by chunk with a graph and the same dropout; push the cached ∂L/∂e into the weights
    for name, parts in inputs.items():
        if embeddings[name].grad is None:
            continue  # the loss did not use these texts
        for part, state, grad in zip(parts, states[name], embeddings[name].grad.split(chunk_size)):
            state.restore()
            with autocast():
                chunk_embeddings = loss_fn.embed(part)                          # (≤ C, D), with a graph
            chunk_embeddings.backward(grad)                                     # this chunk's share of ∂L/∂θ
    after_loss.restore()  # the generators go on from where steps 1 and 2 left them: step 3 drew nothing new
    return losses
