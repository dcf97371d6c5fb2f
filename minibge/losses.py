"""The contrastive loss BGE is fine-tuned with: InfoNCE over in-batch, hard and cross-device negatives.

A batch holds B queries and, for each, a group of G passages: its positive first, then G−1 hard
negatives. The passages arrive flattened, query-major, so query i's group is rows [i·G, (i+1)·G):

    q  (B, D)        p  (B·G, D) = [ p⁺₀ n₀₁ … n₀,G−1 | p⁺₁ n₁₁ … | … | p⁺_B−1 … ]
                                     └── group of q₀ ──┘ └─ q₁ ─┘

With unit-length embeddings the scores are cosines divided by a temperature τ (BGE: 0.01 for
v1, FlagEmbedding's default 0.02), and the loss is a softmax cross-entropy that asks each query
to pick out its own positive:

    s_ij = q_i · p_j / τ                                         (B, B·G)
    L    = −1/B Σ_i log( exp(s_i,iG) / Σ_j exp(s_ij) )           target column i·G

So every query's negatives are its own G−1 hard negatives *plus* every passage of every other
query in the batch ("in-batch negatives"): B·G − 1 negatives for the price of B·G encodings.
With in-batch negatives off, the softmax runs over the query's own group only (target 0):

    L    = −1/B Σ_i log( exp(s_i,iG) / Σ_{k<G} exp(s_i,iG+k) )

Cross-device negatives: under torch.distributed each of W ranks gathers every rank's q and p,
so the softmax sees W·B·G passages. all_gather returns copies without gradient, so I put this
rank's own tensors back into their slots: its loss reaches its own encoder activations, and the
other ranks' rows act as constants. Every rank then computes the *same* global loss L, but rank
r back-propagates only the part of ∂L/∂θ that flows through its own rows, g_r; the full gradient
is Σ_r g_r. Data parallelism averages gradients over ranks, giving (1/W) Σ_r g_r = ∇L / W, so I
multiply the gradient entering the local slots by W (the loss value itself is left untouched):
the averaged gradient then equals the single-process gradient on the concatenated batch exactly.

Knowledge distillation: given teacher scores t (B, G) for each group (e.g. from a cross-encoder),
add the soft-target cross-entropy between softmax(t) and the student's group scores
(FlagEmbedding's kl_div mode: the KL divergence plus the teacher's entropy, a constant):

    L_kd = −1/B Σ_i Σ_k softmax(t_i)_k · log softmax(s_i,iG : iG+G)_k

The reranker's loss (reranker_loss) is the same softmax with no embeddings in it: a cross-encoder
gives each (query, passage) pair of a group one logit z, and the loss asks the positive (index 0)
to win its own group, FlagEmbedding's listwise cross-entropy (no temperature, no in-batch negatives:
a passage of another query would need its own forward pass with this query):

    L_rank = −1/B Σ_i log( exp(z_i,0) / Σ_{k<G} exp(z_i,k) )        plus L_kd on z when teacher scores are given

BGE-M3's unified fine-tuning (m3_loss) has three (B, B·G) score matrices, one per head (dense, lexical,
ColBERT; m3.py), each already divided by τ. Each gets the in-batch InfoNCE above, L_dense, L_lex, L_mul;
their weighted sum is the ensemble teacher s_inter = w1·s_dense + w2·s_lex + w3·s_mul, which gets one
too, L_inter; and with self-knowledge distillation each head learns softmax(s_inter), held constant:

    L  = (λ1·L_dense + λ2·L_lex + λ3·L_mul + L_inter) / 4
    L' = (λ1·L'_dense + λ2·L'_lex + λ3·L'_mul) / 3,     L'_* = −1/B Σ_i Σ_j softmax(s_inter)_ij · log softmax(s_*)_ij
    L_final = (L + L') / 2

with FlagEmbedding's values w = (1, 0.3, 1) and λ = (1, 0.1, 1) (the lexical scores are on another
scale, hence their small weights).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .common import rank_and_world

MAX_TEMPERATURE_NORMALIZED = 0.5  # FlagEmbedding refuses hotter softmaxes over cosines (commit 34d24e8)


def check_pairs(q: torch.Tensor, p: torch.Tensor, temperature: float) -> int:
    """Validate the shapes and the temperature; returns the group size G."""
    if not isinstance(q, torch.Tensor) or not isinstance(p, torch.Tensor):
        raise TypeError(f"q and p must be tensors, got {type(q).__name__} and {type(p).__name__}")
    if q.dim() != 2 or p.dim() != 2:
        raise ValueError(f"q must be (B, D) and p (B·G, D); got shapes {tuple(q.shape)} and {tuple(p.shape)}")
    if q.shape[0] == 0 or q.shape[1] != p.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and p {tuple(p.shape)} need B ≥ 1 and the same dimension D")
    if p.shape[0] % q.shape[0] != 0:
        raise ValueError(f"p must hold a group of G passages per query: {p.shape[0]} passages "
                         f"for {q.shape[0]} queries is not a multiple")
    check_temperature(temperature, normalized=temperature > MAX_TEMPERATURE_NORMALIZED
                      and _unit_length(q) and _unit_length(p))
    return p.shape[0] // q.shape[0]


def check_temperature(temperature: float, normalized: bool = True) -> None:
    """ValueError unless τ > 0, and, for normalised embeddings, τ ≤ MAX_TEMPERATURE_NORMALIZED.
    Fine-tuning calls it before anything is written, so a bad value never leaves a run folder behind."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if normalized and temperature > MAX_TEMPERATURE_NORMALIZED:
        raise ValueError(f"temperature {temperature} is too high for normalised embeddings: cosines lie in "
                         f"[-1, 1], so the softmax would be nearly flat. Use ≤ {MAX_TEMPERATURE_NORMALIZED} "
                         "(BGE uses 0.01–0.02)")


def _unit_length(x: torch.Tensor) -> bool:
    return bool(torch.allclose(x.detach().norm(dim=-1), torch.ones((), dtype=x.dtype, device=x.device), atol=1e-3))


def group_scores(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each query against its own group only: (B, G), positive in column 0."""
    B, D = q.shape
    groups = p.view(B, -1, D)                             # (B, G, D)
    return torch.einsum("bd,bgd->bg", q, groups) / temperature


# -----------------------------------------------------------------------------
# Cross-device gathering

class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `factor` on the way back."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, concatenated in rank order; this rank's slot keeps its autograd graph.

    The gradient flowing back into the local slot is multiplied by the world size, so that
    averaging gradients over ranks yields the gradient of the global loss (module docstring).
    """
    rank, world = rank_and_world()
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.detach().contiguous())  # copies: no gradient flows through these
    gathered[rank] = _ScaleGradient.apply(x, float(world))
    return torch.cat(gathered)  # (W·n, D)


# -----------------------------------------------------------------------------
# The losses

def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float = 0.02, in_batch_negatives: bool = True,
             cross_device: bool = False) -> torch.Tensor:
    """InfoNCE for q (B, D) against query-major passage groups p (B·G, D), positive first; a scalar.

    in_batch_negatives: every passage of the batch is a candidate (target column i·G); off, only
    the query's own group (target 0). cross_device: under torch.distributed, the batch is the
    union of all ranks' batches (needs in_batch_negatives; there is nothing to share without them).
    """
    G = check_pairs(q, p, temperature)
    if not in_batch_negatives:
        scores = group_scores(q, p, temperature)                       # (B, G)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(scores, target)
    if cross_device and rank_and_world()[1] > 1:
        q, p = gather_across_ranks(q), gather_across_ranks(p)          # (W·B, D), (W·B·G, D)
    scores = q @ p.T / temperature                                     # (B, B·G)
    target = torch.arange(q.shape[0], device=q.device) * G             # query i's positive is column i·G
    return F.cross_entropy(scores, target)


def distillation_loss(q: torch.Tensor, p: torch.Tensor, teacher_scores: torch.Tensor,
                      temperature: float = 0.02) -> torch.Tensor:
    """Soft-target cross-entropy between softmax(teacher_scores) (B, G) and the student's group scores."""
    G = check_pairs(q, p, temperature)
    if tuple(teacher_scores.shape) != (q.shape[0], G):
        raise ValueError(f"teacher_scores must be (B, G) = {(q.shape[0], G)}, got {tuple(teacher_scores.shape)}")
    return soft_cross_entropy(group_scores(q, p, temperature), teacher_scores)


def soft_cross_entropy(scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """−mean_i Σ_k softmax(teacher_i)_k · log softmax(scores_i)_k, both (B, G): distillation's loss."""
    targets = teacher_scores.to(scores.dtype).softmax(dim=-1)          # no teacher temperature, as in FlagEmbedding
    return -(targets * scores.log_softmax(dim=-1)).sum(dim=-1).mean()


def reranker_loss(logits: torch.Tensor, group_size: int, teacher_scores: torch.Tensor | None = None) -> dict:
    """A cross-encoder's fine-tuning loss: logits (B·G,) of query-major groups, positive first →
    {"loss", "listwise_ce"[, "distill"]}: cross-entropy over each group, target 0 (module docstring)."""
    if logits.dim() != 1 or logits.numel() == 0 or logits.numel() % group_size != 0:
        raise ValueError(f"logits must be (B·G,) with G = {group_size}, got shape {tuple(logits.shape)}")
    grouped = logits.view(-1, group_size)                              # (B, G): query i's passages in row i
    target = torch.zeros(grouped.shape[0], dtype=torch.long, device=logits.device)
    losses = {"listwise_ce": F.cross_entropy(grouped, target)}
    losses["loss"] = losses["listwise_ce"]
    if teacher_scores is not None:
        if tuple(teacher_scores.shape) != tuple(grouped.shape):
            raise ValueError(f"teacher_scores must be (B, G) = {tuple(grouped.shape)}, got {tuple(teacher_scores.shape)}")
        losses["distill"] = soft_cross_entropy(grouped, teacher_scores)
        losses["loss"] = losses["loss"] + losses["distill"]
    return losses


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, temperature: float = 0.02, in_batch_negatives: bool = True,
                     cross_device: bool = False, teacher_scores: torch.Tensor | None = None) -> dict:
    """What a fine-tuning step back-propagates: {"loss", "info_nce"[, "distill"]}.

    Distillation uses this rank's groups only (the local slice, as FlagEmbedding does): its mean
    over B local queries, averaged over ranks, is the mean over all W·B queries.
    """
    losses = {"info_nce": info_nce(q, p, temperature, in_batch_negatives, cross_device)}
    losses["loss"] = losses["info_nce"]
    if teacher_scores is not None:
        losses["distill"] = distillation_loss(q, p, teacher_scores, temperature)
        losses["loss"] = losses["loss"] + losses["distill"]
    return losses


M3_TEACHER_WEIGHTS = (1.0, 0.3, 1.0)  # w1, w2, w3: dense, lexical, ColBERT in s_inter
M3_LOSS_WEIGHTS = (1.0, 0.1, 1.0)     # λ1, λ2, λ3: the same three in L and L'


def m3_loss(dense: torch.Tensor, sparse: torch.Tensor, colbert: torch.Tensor, group_size: int,
            teacher_weights=M3_TEACHER_WEIGHTS, loss_weights=M3_LOSS_WEIGHTS, self_distill: bool = True) -> dict:
    """BGE-M3's unified loss from three (B, B·G) score matrices, already divided by the temperature
    (module docstring) → {"loss", "dense", "sparse", "colbert", "ensemble"[, "distill"]}."""
    if not (dense.shape == sparse.shape == colbert.shape) or dense.dim() != 2 or \
            dense.shape[1] != dense.shape[0] * group_size:
        raise ValueError(f"the three score matrices must be (B, B·G) with G = {group_size}; got "
                         f"{tuple(dense.shape)}, {tuple(sparse.shape)}, {tuple(colbert.shape)}")
    target = torch.arange(dense.shape[0], device=dense.device) * group_size  # query i's positive: column i·G
    w1, w2, w3 = teacher_weights
    l1, l2, l3 = loss_weights
    ensemble = w1 * dense + w2 * sparse + w3 * colbert                       # s_inter (B, B·G)
    losses = {name: F.cross_entropy(scores, target) for name, scores in
              (("dense", dense), ("sparse", sparse), ("colbert", colbert), ("ensemble", ensemble))}
    losses["loss"] = (l1 * losses["dense"] + l2 * losses["sparse"] + l3 * losses["colbert"] + losses["ensemble"]) / 4
    if self_distill:
        teacher = ensemble.detach()  # a target, not a path for gradients
        losses["distill"] = (l1 * soft_cross_entropy(dense, teacher) + l2 * soft_cross_entropy(sparse, teacher)
                             + l3 * soft_cross_entropy(colbert, teacher)) / 3
        losses["loss"] = (losses["loss"] + losses["distill"]) / 2
    return losses
