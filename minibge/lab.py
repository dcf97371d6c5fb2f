"""The divergence lab: break one detail of a correct BERT at a time and measure what it costs.

A hand-written BERT that "runs" is easy; one that reproduces a checkpoint needs a dozen details
right at once, and most wrong versions still produce plausible-looking vectors. The lab makes
the cost of each detail visible. It loads a real checkpoint, then, for each classic mistake:

    correct embedder ──deepcopy──► copy ──apply one mistake──► wrong embedder
                                                                     │
        probe batch (B sentences, padded) ──► both models ──► max |Δ| of the last hidden state
                                          └─► both embedders ──► mean cos(wrong vector, correct vector)
        STS-B pairs ──► evaluate.sts(wrong embedder) ──► Spearman (cosine), and of the raw dot products

Every mistake is one small function that edits a *copy* of a loaded model, never a copy of
model.py: swap an activation, change an eps, wrap a layer, transform the mask on its way in.
That keeps each mistake exactly as big as the slip it imitates, and model.py untouched.

    minibge lab                                      # all mistakes, full STS-B test set → a markdown table
    minibge lab --limit 100 --output /tmp/lab.md     # a quick look on the first 100 pairs

Two readings of the table that surprise people: dropping the L2 normalisation leaves the cosine
Spearman exactly unchanged (a cosine normalises anyway) and only shows up in dot-product scores;
and dropping the padding mask costs little on STS-B because encode() sorts texts by length, so a
batch holds little padding. Both are real properties of the evaluation, not of the mistakes.
"""
from __future__ import annotations

import copy
import logging
import math
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .embedder import BATCH_SIZE, Embedder
from .evaluate.tasks import spearman, sts
from .model import activation, l2_normalize

logger = logging.getLogger(__name__)

COMMAND = "minibge lab"


@dataclass(frozen=True)
class Mistake:
    name: str                          # short id, for --only and for tests
    title: str                         # what the slip is, in the table
    why: str                           # one line: why it matters
    apply: Callable[[Embedder], None]  # edits the given (copied) embedder in place
    pooling: str | None = None         # only for a model with this pooling ("cls" / "mean"); None: any


# -----------------------------------------------------------------------------
# The mistakes, each one edit to a copied embedder. Model-level ones change the last hidden state;
# the last four act after the encoder (pooling, normalisation, train mode).

def tanh_gelu(embedder: Embedder) -> None:
    for layer in embedder.model.layers:
        layer.feed_forward.act = activation("gelu_pytorch_tanh")  # GPT-2's approximation


def layer_norm_eps_1e5(embedder: Embedder) -> None:
    for module in embedder.model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-5  # nn.LayerNorm's default, 10⁷ times BERT's 1e-12


class PreLNLayer(nn.Module):
    """A loaded post-LN layer run GPT-2 style: normalise *before* each sublayer, add the raw residual.

    correct (post-LN):  a = LN₁(x + Attn(x));      y = LN₂(a + FFN(a))
    this   (pre-LN):    a = x + Attn(LN₁(x));      y = a + FFN(LN₂(a))
    """

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, mask=None, key_value_states=None, need_probs=False, score_bias=None):
        layer = self.layer
        attended, probs = layer.attention(layer.attention_norm(x), mask, key_value_states, need_probs, score_bias)
        x = x + attended
        return x + layer.feed_forward(layer.ffn_norm(x)), probs


def pre_ln(embedder: Embedder) -> None:
    layers = embedder.model.layers
    for i, layer in enumerate(layers):
        layers[i] = PreLNLayer(layer)


class InputResidualLayer(nn.Module):
    """The feed-forward's residual taken from the layer *input* x instead of the attention output a:
    y = LN₂(x + FFN(a)) rather than LN₂(a + FFN(a)). HF's BertOutput adds `input_tensor`, which is a."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, mask=None, key_value_states=None, need_probs=False, score_bias=None):
        layer = self.layer
        attended, probs = layer.attention(x, mask, key_value_states, need_probs, score_bias)
        a = layer.attention_norm(x + attended)
        return layer.ffn_norm(x + layer.feed_forward(a)), probs


def ffn_residual_from_input(embedder: Embedder) -> None:
    layers = embedder.model.layers
    for i, layer in enumerate(layers):
        layers[i] = InputResidualLayer(layer)


def scale_twice(embedder: Embedder) -> None:
    # pre-scaling q by 1/√d and then calling SDPA (which scales again) is the same function as
    # shrinking the query projection by 1/√d, so I edit the copy's weights rather than the code
    with torch.no_grad():
        for layer in embedder.model.layers:
            attention = layer.attention
            attention.query.weight /= math.sqrt(attention.head_dim)
            attention.query.bias /= math.sqrt(attention.head_dim)


def _wrap_forward(model: nn.Module, change: Callable) -> None:
    """Route model(input_ids, attention_mask, token_type_ids, attention_bias) through change(...) first:
    the place where a caller's mistakes about the mask happen."""
    forward = model.forward

    def wrapped(input_ids, attention_mask=None, token_type_ids=None, attention_bias=None):
        return forward(*change(input_ids, attention_mask, token_type_ids, attention_bias))

    model.forward = wrapped  # an instance attribute: nn.Module.__call__ finds it before the class's


def causal_mask(embedder: Embedder) -> None:
    def add_causal_bias(input_ids, attention_mask, token_type_ids, attention_bias):
        T = input_ids.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).triu(1)  # (T, T), True above the diagonal
        bias = torch.zeros(T, T, device=input_ids.device).masked_fill(future, torch.finfo(torch.float32).min)
        return input_ids, attention_mask, token_type_ids, bias  # through the attention_bias research hook
    _wrap_forward(embedder.model, add_causal_bias)


def inverted_mask(embedder: Embedder) -> None:
    # nn.MultiheadAttention's key_padding_mask means True = *ignore*; HF's attention_mask means 1 = keep
    _wrap_forward(embedder.model, lambda ids, mask, types, bias: (ids, 1 - mask, types, bias))


def no_padding_mask(embedder: Embedder) -> None:
    _wrap_forward(embedder.model, lambda ids, mask, types, bias: (ids, None, types, bias))


def no_token_type(embedder: Embedder) -> None:
    # with the table zeroed, adding "row 0" adds nothing: the same as leaving the term out
    with torch.no_grad():
        embedder.model.embeddings.token_type_embeddings.weight.zero_()


def positions_offset_by_one(embedder: Embedder) -> None:
    embeddings = embedder.model.embeddings
    forward = embeddings.forward

    def shifted(input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        position_ids = torch.arange(1, T + 1, device=embeddings.position_embeddings.weight.device)[None]  # (1, T): 1..T
        return forward(input_ids, token_type_ids, position_ids, inputs_embeds)

    embeddings.forward = shifted


def dropout_on(embedder: Embedder) -> None:
    embedder.model.train()  # forgot model.eval(): every forward pass drops 10% of activations at random


def pooler_output(embedder: Embedder) -> None:
    embed = embedder.embed
    embedder.pooling = "cls"

    def embed_with_pooler(texts_or_batch, max_length=None, normalize=True):
        cls = embed(texts_or_batch, max_length, normalize=False)       # (B, H): h_CLS
        pooled = embedder.model.pooler_output(cls.unsqueeze(1))        # the pooler reads position 0 of (B, 1, H)
        return l2_normalize(pooled) if normalize else pooled

    embedder.embed = embed_with_pooler


def mean_instead_of_cls(embedder: Embedder) -> None:
    embedder.pooling = "mean"


def cls_instead_of_mean(embedder: Embedder) -> None:
    embedder.pooling = "cls"


def no_l2_normalisation(embedder: Embedder) -> None:
    embed = embedder.embed
    embedder.embed = lambda texts_or_batch, max_length=None, normalize=True: embed(texts_or_batch, max_length, False)


MISTAKES = [
    Mistake("tanh-gelu", "tanh GELU instead of erf", "BERT was trained with the exact erf GELU; GPT-2's "
            "tanh approximation differs by up to 5e-4 per activation, and the error compounds over layers", tanh_gelu),
    Mistake("eps-1e-5", "LayerNorm eps 1e-5 instead of 1e-12", "PyTorch's default eps; it matters wherever a "
            "token's variance is small, and every layer has two LayerNorms", layer_norm_eps_1e5),
    Mistake("pre-ln", "pre-LN instead of post-LN", "the weights were trained to be normalised *after* each "
            "residual sum; moving the LayerNorm lets the residual stream grow un-normalised", pre_ln),
    Mistake("ffn-residual", "FFN residual from the layer input", "the second residual adds the attention "
            "block's normalised output, not the layer input: an easy slip when writing x = x + ...",
            ffn_residual_from_input),
    Mistake("scale-twice", "1/√d applied twice", "pre-scaling q and then calling SDPA (which scales too) "
            "flattens every attention distribution", scale_twice),
    Mistake("causal", "causal mask (is_causal=True)", "copied from GPT code: each token only sees its left "
            "context, so the encoder loses half of what it was trained to see", causal_mask),
    Mistake("mask-polarity", "inverted mask polarity", "1 = keep (HF) vs True = ignore (nn.MultiheadAttention): "
            "real tokens attend only to padding, or to nothing", inverted_mask),
    Mistake("no-mask", "no padding mask", "real tokens attend to [PAD] positions; harmless without padding, "
            "so it hides until batches mix lengths", no_padding_mask),
    Mistake("no-token-type", "token-type embedding left out", "BGE passes no segments, but HF still adds "
            "row 0 of the token-type table to every token: skipping it shifts every input vector", no_token_type),
    Mistake("positions+1", "position ids offset by one", "RoBERTa-style offsets (positions from padding_idx + 1) "
            "do not apply to BERT: every token gets its neighbour's position vector", positions_offset_by_one),
    Mistake("dropout", "dropout left on (no model.eval())", "training-mode dropout makes embeddings random: "
            "the same text gives a different vector each call", dropout_on),
    Mistake("pooler", "pooler output instead of the sentence vector", "tanh(W·h_CLS + b) was trained for "
            "next-sentence prediction; BGE and sentence-transformers never use it", pooler_output),
    Mistake("mean-for-cls", "mean pooling instead of CLS", "a CLS model (BGE) was trained so that h_CLS "
            "carries the meaning; the token average is a different vector", mean_instead_of_cls, pooling="cls"),
    Mistake("cls-for-mean", "CLS pooling instead of mean", "a mean-pooling model (all-MiniLM) was trained on "
            "the token average; its h_CLS was never asked to summarise", cls_instead_of_mean, pooling="mean"),
    Mistake("no-l2", "no L2 normalisation", "cosine scores do not care, but q @ p.T does: without unit "
            "vectors, dot products reward long vectors", no_l2_normalisation),
]


def applicable(embedder: Embedder, mistakes=None) -> list[Mistake]:
    """The mistakes that make sense for this embedder (pooling swaps depend on its pooling)."""
    return [m for m in (MISTAKES if mistakes is None else mistakes) if m.pooling in (None, embedder.pooling)]


def with_mistake(embedder: Embedder, mistake: Mistake) -> Embedder:
    """A deep copy of `embedder` with one mistake applied; the original stays correct."""
    wrong = Embedder(copy.deepcopy(embedder.model), embedder.tokenizer, embedder.pooling, embedder.max_length,
                     embedder.query_instruction, name=f"{embedder.name} [{mistake.name}]")
    mistake.apply(wrong)
    return wrong


# -----------------------------------------------------------------------------
# Measuring

class _RecordingEmbedder:
    """Stands in for an embedder inside evaluate.sts and keeps the vectors it asked for, so the same
    vectors can also be scored by their raw dot product (what `q @ p.T` computes)."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.vectors = {}

    def encode(self, texts, **kwargs):
        vectors = self.embedder.encode(texts, **kwargs)
        self.vectors.update(zip(texts, vectors))
        return vectors


def sts_scores(embedder: Embedder, sentences1, sentences2, gold, batch_size: int = BATCH_SIZE) -> dict:
    """STS-B Spearman ×100 of the cosine (evaluate.sts) and of the raw dot product of the same vectors."""
    recorder = _RecordingEmbedder(embedder)
    cosine = sts(recorder, sentences1, sentences2, gold, batch_size=batch_size, show_progress_bar=False)
    dots = [float(np.dot(recorder.vectors[a], recorder.vectors[b])) for a, b in zip(sentences1, sentences2)]
    return {"spearman_cosine": cosine["cosine_spearman"], "spearman_dot": 100 * spearman(dots, gold)}


@torch.inference_mode()
def probe(embedder: Embedder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state (B, T, H), sentence vectors (B, D)) of one padded batch."""
    return embedder.model(batch["input_ids"], batch["attention_mask"]), embedder.embed(batch)


def compare(reference: tuple, wrong: tuple, attention_mask: torch.Tensor) -> dict:
    """Hidden-state max |Δ| over real tokens (padded positions are garbage in both) and mean cosine of
    the sentence vectors."""
    (hidden, vectors), (wrong_hidden, wrong_vectors) = reference, wrong
    real = attention_mask.bool()
    cosine = F.cosine_similarity(vectors.double(), wrong_vectors.double(), dim=-1)
    return {"hidden_max_diff": (hidden - wrong_hidden)[real].abs().max().item(),
            "vector_cosine": cosine.mean().item()}


def run_lab(embedder: Embedder, sentences1, sentences2, gold, mistakes=None, probe_size: int = 32,
            batch_size: int = BATCH_SIZE, seed: int = 0) -> list[dict]:
    """One row per mistake (the first row is the correct model): effects on hidden states and STS-B.

    The probe batch is the first `probe_size` distinct STS-B sentences, padded together, so the
    masking mistakes have padding to get wrong. `seed` fixes the dropout row's random masks.
    """
    if embedder.model.training:
        raise ValueError("run the lab on a model in eval mode (dropout is one of the mistakes it measures)")
    texts = list(dict.fromkeys(list(sentences1) + list(sentences2)))[:probe_size]
    batch = embedder.tokenize(texts)
    reference = probe(embedder, batch)
    rows = []
    for mistake in [None] + applicable(embedder, mistakes):
        start = time.perf_counter()
        wrong = embedder if mistake is None else with_mistake(embedder, mistake)
        torch.manual_seed(seed)
        row = {"name": "correct" if mistake is None else mistake.name,
               "title": f"none (the correct model, {embedder.pooling} pooling)" if mistake is None else mistake.title,
               "why": "" if mistake is None else mistake.why,
               **compare(reference, probe(wrong, batch), batch["attention_mask"]),
               **sts_scores(wrong, sentences1, sentences2, gold, batch_size)}
        row["seconds"] = time.perf_counter() - start
        logger.info("%-14s hidden max|Δ| %.3g  STS-B %.2f", row["name"], row["hidden_max_diff"], row["spearman_cosine"])
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Reporting

def format_table(rows: list[dict]) -> str:
    """The markdown table: one line per mistake, Spearman differences against the first (correct) row."""
    base = rows[0]
    lines = ["| mistake | hidden state max abs diff | cos(vector, correct) | STS-B Spearman (cosine) | Δ | "
             "STS-B Spearman (dot product) | why it matters |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        delta = round(row["spearman_cosine"] - base["spearman_cosine"], 2) + 0.0  # + 0.0: never print -0.00
        lines.append(f"| {row['title']} | {row['hidden_max_diff']:.3g} | {row['vector_cosine']:.4f} | "
                     f"{row['spearman_cosine']:.2f} | {'' if row is base else f'{delta:+.2f}'} | "
                     f"{row['spearman_dot']:.2f} | {row['why']} |")
    return "\n".join(lines)


def machine() -> str:
    """Where the numbers come from: OS, CPU architecture, torch version and thread count."""
    return f"{platform.system()} {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"


def format_page(rows: list[dict], model_name: str, n_pairs: int, n_total: int, command: str,
                probe_size: int = 32) -> str:
    """docs/lab.md: the table and how it was made."""
    subset = "the full STS-B test set" if n_pairs == n_total else f"the first {n_pairs} of {n_total} STS-B test pairs"
    seconds = sum(row["seconds"] for row in rows)
    return f"""# The divergence lab

Each row breaks exactly one detail of a correct BERT (see `minibge/lab.py`, one small function per
mistake) in a copy of the real **{model_name}** checkpoint and measures what changes:

- **hidden state max abs diff**: the largest difference of the last hidden state from the correct model,
  over the real (unpadded) tokens of a batch of {probe_size} STS-B sentences padded together
  (0 for the mistakes that act after the encoder);
- **cos(vector, correct)**: the mean cosine between the wrong and the correct sentence vectors on that batch;
- **STS-B Spearman (cosine)**: `minibge.evaluate.sts` on {subset} (×100, the MTEB main score), and its
  difference Δ from the correct model; **(dot product)**: the same vectors scored by their raw dot product,
  which is what `q @ p.T` computes and where a missing normalisation shows.

Regenerate with:

    {command}

Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}, {seconds:.0f} s in all.

{format_table(rows)}

How to read it:

- On the full test set the correct row reproduces the checkpoint's published MTEB STS-B score (for
  all-MiniLM-L6-v2: 82.03, see docs/evaluation.md); the other rows differ from it by one mistake each.
- The numerical slips (tanh GELU, eps) change the hidden states by a few thousandths and the score hardly
  at all: they are the ones that only an equivalence test against transformers catches. The structural ones
  (pre-LN, the wrong residual, a causal or inverted mask) wreck the vectors outright.
- "no padding mask" costs little in the score because `encode()` sorts texts by length, so each batch holds
  little padding; the hidden-state column, measured on a deliberately mixed-length batch, shows the damage
  per token when a batch does mix lengths.
- "no L2 normalisation" leaves the cosine score exactly unchanged, since a cosine normalises anyway; it shows
  up only in dot-product scoring, which is what retrieval with `q @ p.T` or a vector database does.
- A CLS model (`-m` a BGE folder) gets the "mean pooling instead of CLS" row in place of "CLS instead of mean".
"""
