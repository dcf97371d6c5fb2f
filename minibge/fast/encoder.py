"""The fast backend that encode() runs: the same BertModel, less work, faster kernels.

model.py is the readable reference; this file computes the same function with less work and
shares every weight with it (it reads model.py's modules, it never copies their code). A
FastEncoder is called like the model, `fast(input_ids, attention_mask) -> (B, T, H)`, and
Embedder.encode() plugs it in where the model would run: tokenizing, ordering by length,
pooling and normalising stay in embedder.py, one pipeline for both. encode() falls back to the
plain model whenever this file could not compute the same thing (a subclassed or patched
model, hooks, train mode, attn_impl="manual", a customised embed(): see model_blocker);
`load_embedder(..., fast=False)` always takes the plain path. The ideas:

1. Unpadding. A right-padded batch spends FLOPs on [PAD] rows whose outputs are thrown away
   (28-37% of the rows in the GPU benchmark's batches; less after sorting by length). Every part
   of a BERT layer except attention acts on each token alone (the Linears, GELU, LayerNorm, the
   residual adds), so I pack the real tokens into one (total_tokens, H) matrix and run those
   parts on it; only attention needs to know which tokens form a sentence.

       padded (B=3, T=5)            packed (N = 5 + 2 + 4 = 11, H)
       a a a a a                    a a a a a b b c c c c
       b b ⬚ ⬚ ⬚          ──►       └─ seq 0 ─┘└ 1 ┘└─ 2 ──┘
       c c c c ⬚                    offsets (cu_seqlens) = [0, 5, 7, 11]

   Attention then runs in one of four ways, all the same function (`attention=`; "auto" takes
   "padded" on a GPU, as measured in docs/benchmarks.md, and on a CPU whichever of the first two
   choose_attention measured faster on this machine, once, cached by kernels.py):
     "buckets"  group the sentences by exact length; each group is a dense (b, L) batch with no
                mask at all, so SDPA may take its fastest kernel. Cheap calls on the CPU, and the
                pipeline's batches (sorted by token count) have one or two lengths.
     "padded"   scatter q, k, v back into (B, T) and make one masked SDPA call (one kernel).
     "nested"   torch.nested jagged tensors: one SDPA call over ragged sequences, which CUDA
                runs with the variable-length Flash kernel (the CPU falls back to math).
     "varlen"   the variable-length Flash kernel called directly (torch.nn.attention.varlen): the
                packed (N, heads, D) q, k, v and the offsets are exactly its inputs, so nothing is
                re-padded or wrapped. CUDA and fp16/bf16 only (the kernel has no other), and not yet
                what "auto" takes: no GPU run has measured it against "padded" (docs/benchmarks.md).
   The output is scattered back to (B, T, H), zeros at padding, for the embedder's pooling.
   Within "buckets", a short group (up to SHORT_ATTENTION tokens) on the CPU may skip SDPA, whose
   set-up can cost more than such a group's work, and spell attention out as three ops, with the
   softmax over the last dimension ("plain") or over the keys laid out as rows ("transposed": the
   softmax vectorises across queries, which pays where the keys are fewer than a vector register
   holds). Which of SDPA, "plain" and "transposed" runs is measured per band of lengths
   (SHORT_BANDS: 1-15 and 16-32 tokens) by choose_short_attention, once per machine; longer
   groups always take SDPA.
2. A fused QKV projection. The query, key and value Linears read the same input, so one
   (3H, H) matmul does the work of three; the weight [W_q; W_k; W_v] is concatenated once,
   when the FastEncoder is built. A packed row of q|k|v splits into heads by a view:

       (N, 3H) ─view─► (N, 3, heads, D)      (no copy until attention needs (heads, L, D))

3. oneDNN matmuls on the CPU (onednn.py), with GELU and the residual adds fused into them, where
   kernels.choose_matmul measured them faster than MKL on this machine: PyTorch's fp32 nn.Linear goes
   to MKL's sgemm, which is slow on some CPUs and fast on others (docs/benchmarks.md). The
   weights are packed once into oneDNN's blocked layout (a second copy of the encoder's matmul
   weights: 42 MB for MiniLM), which saves the reorder oneDNN would do on every call.
4. Only the rows that pooling reads. [CLS] pooling (BGE's) reads one row per text of the last
   block's output, and everything in that block but attention is token-wise, so `first_tokens`
   runs the last block's out-projection, feed-forward and LayerNorms on those B rows, not all N
   (attention still reads every token's keys and values: attend_first). Mean pooling reads every
   row, so it gets the whole forward().
5. A bf16 model on the CPU (load_embedder(dtype="bfloat16"), speed_options(precision="bf16"))
   multiplies in bf16 and does everything else in fp32 (`self.mixed`, bf16_products): each matmul
   rounds its input to bf16 and runs on the model's bf16 weights through oneDNN (fp32 accumulation,
   GELU fused, weights packed), while the residual stream (from the embeddings' output, which the
   bf16 embeddings module rounds once), the residual adds, LayerNorm and attention stay fp32. The
   products are where bf16 pays
   (twice fp32's rate where the CPU multiplies bf16 in hardware); rounding the residual stream
   to bf16 after every add as well is what moved the vectors ~100× more (docs/benchmarks.md).
   On a GPU a bf16 model runs in bf16 throughout.
6. Optional modes that change the numbers slightly (speed_options): bf16 (above) on CPUs with native
   bf16, int8 matmuls (int8.py: per-channel weights, per-token activations), torch.compile of the
   token-wise block tails.

FastEncoder is for inference: it skips dropout. The fused and packed weights are copies, re-made
whenever the model's Linears have changed (an optimizer step, load_state_dict, .to(), a swapped
module), so encoding after training is safe. One change it cannot see: an in-place write through
`.data` (`linear.weight.data.copy_(w)`), which bypasses the version counter autograd keeps; after
such a write, call `embedder.fast_encoder.sync(force=True)`, or write under torch.no_grad() instead.
"""
import functools
import importlib.util
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import require_native_bf16
from . import kernels
from . import onednn as onednn_kernels
from .int8 import Int8Linear, calibrate, load_calibration
from ..model import BertModel

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("auto", "buckets", "padded", "nested", "varlen")
SPEED_PRECISIONS = ("fp32", "bf16", "int8")  # speed_options' modes (not encode's output precision)
QKV_LINEARS = ("qkv", "query", "key", "value")  # a block's matmuls before attention (block_linears' names)
TAIL_LINEARS = ("output", "up", "down")         # and after it (block_tail)


class Packing:
    """Where the real tokens of a (B, T) batch sit once packed into (N, ·), N = Σ lengths."""

    def __init__(self, lengths: torch.Tensor, token_index: torch.Tensor, max_len: int):
        self.shape = (lengths.numel(), max_len)
        self.lengths = lengths                                                    # (B,)
        self.token_index = token_index                                            # (N,) into B*T
        self.offsets = F.pad(lengths.cumsum(0), (1, 0))                           # (B+1,) cu_seqlens
        self.positions = token_index % max_len                                    # (N,) each token's position id
        self._buckets = None

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packing":
        """Any 0/1 mask (B, T); positions stay the model's 0..T-1, whatever the padding side."""
        token_index = attention_mask.flatten().nonzero().squeeze(1)
        return cls(attention_mask.sum(dim=1), token_index, attention_mask.shape[1])

    @property
    def num_tokens(self) -> int:
        return self.token_index.numel()

    def buckets(self):
        """[(length L, token rows (b, L) into the packed matrix)] for each distinct sentence length.
        One host sync per batch (lengths.tolist()), then everything stays on the device."""
        if self._buckets is None:
            lengths, starts = self.lengths.tolist(), self.offsets[:-1]
            self._buckets = []
            for L in sorted(set(lengths)):
                members = torch.tensor([i for i, n in enumerate(lengths) if n == L], device=starts.device)
                rows = starts[members, None] + torch.arange(L, device=starts.device)  # (b, L)
                self._buckets.append((L, rows))
        return self._buckets

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, H) → (B, T, H) with zeros at padded positions."""
        B, T = self.shape
        out = packed.new_zeros(B * T, packed.shape[-1])
        out[self.token_index] = packed
        return out.view(B, T, -1)


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """(b, L, 3H) → q, k, v, each (b, heads, L, D): views only."""
    b, L, _ = qkv.shape
    q, k, v = qkv.view(b, L, 3, num_heads, -1).unbind(dim=2)  # each (b, L, heads, D)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(b, heads, L, D) → (b·L, H): heads side by side again."""
    b, heads, L, D = y.shape
    return y.transpose(1, 2).reshape(b * L, heads * D)


# -----------------------------------------------------------------------------
# Attention over one dense group of equal-length sentences, and which way to compute it (measured)

SHORT_ATTENTION = 32  # the longest group the CPU may spell attention out for; longer ones always take SDPA
SHORT_BANDS = ((15, (6, 12)), (SHORT_ATTENTION, (20, 28)))  # (longest length of a band, the lengths timed for it)
SHORT_METHODS = ("sdpa", "plain", "transposed")  # candidates for a band; a tie goes to the first
# sentences in each timed group: a length bucket of encode's batches (256 texts sorted by length)
# holds ~50-200 short ones, median ~100 on STS-B. (Timed on 8, SDPA's fixed set-up weighed too much: it
# won the 1-15 band on one run, then cost 2.4× the transposed softmax on real buckets; docs/benchmarks.md.)
SHORT_GROUP = 96
ATTENTION_REPEATS = 5  # timed passes per attention candidate (each a few milliseconds at most), after one warm-up


def attention_sdpa(q, k, v):
    """PyTorch's kernel. On the CPU it is flash attention, working on blocks of queries and keys: for
    long groups its blocking keeps the (L, L) scores in cache and wins; for short ones its set-up may
    cost more than the work."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_plain(q, k, v):
    """The three ops spelled out: softmax(q kᵀ / √D) v, softmax over the last dimension (the keys)."""
    scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)     # (b, heads, L_queries, L_keys)
    return scores.softmax(dim=-1) @ v


def attention_transposed(q, k, v):
    """The same, with the scores laid out as (keys, queries) and the softmax over dim -2.
    PyTorch's CPU softmax over the last dimension vectorises along it, and was several times slower
    when that dimension is shorter than one vector register (16 floats with AVX-512); over dim -2 it
    vectorises across the last dimension instead. Whether that pays depends on the CPU: measured."""
    scores_t = (k @ q.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)   # (b, heads, L_keys, L_queries)
    return scores_t.softmax(dim=-2).transpose(-1, -2) @ v             # a softmax over the keys, as above


SHORT_ATTEND = {"sdpa": attention_sdpa, "plain": attention_plain, "transposed": attention_transposed}


def dense_attention(q, k, v, plan=()):
    """Unmasked attention over a dense group, (b, heads, L, D) each → (b, heads, L, D).

    plan: ((longest, method), ...) by increasing `longest`, from choose_short_attention: on the CPU a
    group of L tokens takes the method of the first band with L <= longest, SHORT_ATTEND's names;
    longer groups, other devices and the empty plan take SDPA. The same function whichever runs.
    """
    if q.device.type == "cpu":
        L = q.shape[-2]
        for longest, method in plan:
            if L <= longest:
                return SHORT_ATTEND[method](q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def time_short_attention(num_heads: int, head_dim: int, lengths, dtype=torch.float32) -> dict:
    """method -> best seconds to attend over SHORT_GROUP sentences of each of `lengths` tokens, with
    q, k, v the same strided views of a packed q|k|v that the fast path hands to dense_attention."""
    generator = torch.Generator().manual_seed(0)
    H = num_heads * head_dim
    groups = [split_qkv(torch.randn(SHORT_GROUP, L, 3 * H, generator=generator).to(dtype), num_heads)
              for L in lengths]                                          # q, k, v: (b, heads, L, D) each
    return kernels.best_times({method: functools.partial(lambda attend: [attend(*g) for g in groups], attend)
                               for method, attend in SHORT_ATTEND.items()}, repeats=ATTENTION_REPEATS)


@functools.cache
def choose_short_attention(num_heads: int, head_dim: int, dtype=torch.float32) -> tuple:
    """((longest, kernels.Choice), ...), one per SHORT_BANDS band: which SHORT_METHODS method attends
    fastest on this CPU over groups up to `longest` tokens (measured once, cached; kernels.py)."""
    bands, shortest = [], 1
    for longest, lengths in SHORT_BANDS:
        key = (f"{kernels.machine_key()} | attention of {shortest}-{longest} tokens (timed at {lengths}, "
               f"{SHORT_GROUP} sentences each) "
               f"heads={num_heads} D={head_dim} {str(dtype).removeprefix('torch.')}")
        choice = kernels.choose(f"attention of groups of {shortest}-{longest} tokens", key, SHORT_METHODS,
                                lambda lengths=lengths: time_short_attention(num_heads, head_dim, lengths, dtype),
                                f"per {SHORT_GROUP} sentences of {' and '.join(map(str, lengths))} tokens")
        bands.append((longest, choice))
        shortest = longest + 1
    return tuple(bands)


def attend_buckets(qkv, packing: Packing, num_heads: int, plan=()):
    """Dense, unmasked attention per group of equal-length sentences. qkv (N, 3H) → (N, H).
    plan: how short groups are attended (dense_attention)."""
    H = qkv.shape[-1] // 3
    buckets = packing.buckets()
    if len(buckets) == 1:  # every sentence has the same length: the packed matrix *is* a dense batch
        L, _ = buckets[0]
        return merge_heads(dense_attention(*split_qkv(qkv.view(-1, L, 3 * H), num_heads), plan=plan))
    out = qkv.new_empty(qkv.shape[0], H)
    for L, rows in buckets:
        y = dense_attention(*split_qkv(qkv[rows], num_heads), plan=plan)  # (b, heads, L, D)
        out[rows.flatten()] = merge_heads(y)
    return out


def key_mask(packing: Packing, device) -> torch.Tensor:
    """(B, 1, 1, T) bool, True at a real token: which keys of the re-padded batch attention may read."""
    B, T = packing.shape
    mask = torch.zeros(B * T, dtype=torch.bool, device=device)
    mask[packing.token_index] = True
    return mask.view(B, 1, 1, T)                                                    # (B, 1, 1, T)


def attend_padded(qkv, packing: Packing, num_heads: int):
    """Back to (B, T) for one masked SDPA call, then packed again. qkv (N, 3H) → (N, H)."""
    padded = packing.unpack(qkv)                                                    # (B, T, 3H)
    y = F.scaled_dot_product_attention(*split_qkv(padded, num_heads), attn_mask=key_mask(packing, qkv.device))
    return merge_heads(y)[packing.token_index]


def attend_first(qkv, packing: Packing, num_heads: int):
    """Attention for one query per sentence, its first token's, over all of its keys: (N, 3H) → (B, H).
    What the last block needs when only the first token's output is read ([CLS] pooling,
    FastEncoder.first_tokens). One masked SDPA call over the re-padded keys and values; each query
    row is a single token, so there is no (L, L) work to bucket."""
    B, H = packing.shape[0], qkv.shape[-1] // 3
    _, k, v = split_qkv(packing.unpack(qkv), num_heads)                             # (B, heads, T, D) each
    q = qkv[packing.offsets[:-1], :H].view(B, 1, num_heads, -1).transpose(1, 2)    # (B, heads, 1, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(packing, qkv.device))  # (B, heads, 1, D)
    return merge_heads(y)                                                           # (B, H)


def attend_nested(qkv, packing: Packing, num_heads: int):
    """One SDPA call over jagged sequences (torch.nested). qkv (N, 3H) → (N, H)."""
    H = qkv.shape[-1] // 3
    # jagged SDPA wants each of q, k, v contiguous once its heads are transposed out
    q, k, v = (torch.nested.nested_tensor_from_jagged(part.contiguous(), packing.offsets)
               .unflatten(-1, (num_heads, H // num_heads)).transpose(1, 2)            # (B, heads, j, D)
               for part in qkv.split(H, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v)                                       # (B, heads, j, D)
    return y.transpose(1, 2).flatten(-2).values()                                     # (N, H)


def varlen_unavailable(device: torch.device) -> str | None:
    """None where attention="varlen" can run, else why not (one line, for the ValueError)."""
    if device.type != "cuda":
        return f"attention='varlen' is the CUDA variable-length Flash kernel; the model is on {device.type}"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:  # torch >= 2.10
        return f"attention='varlen' needs torch.nn.attention.varlen, which torch {torch.__version__} lacks"
    return None


def attend_varlen(qkv, packing: Packing, num_heads: int):
    """One call of the variable-length Flash kernel on the packed rows. qkv (N, 3H) → (N, H).
    Its inputs are what the packing already has: q, k, v as (N, heads, D) and the cu_seqlens offsets
    (int32), plus the longest sentence (the padded width T of the batch it came from)."""
    from torch.nn.attention.varlen import varlen_attn
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention='varlen' runs in float16 or bfloat16 (Flash has no {qkv.dtype} kernel); "
                         "use model.to(torch.float16) or attention='padded'")
    N, H = qkv.shape[0], qkv.shape[-1] // 3
    q, k, v = qkv.view(N, 3, num_heads, H // num_heads).unbind(dim=1)    # each (N, heads, D), strided views
    offsets = packing.offsets.to(torch.int32)                               # (B+1,) cu_seqlens
    longest = packing.shape[1]  # T: the batch was padded to its longest sentence
    y = varlen_attn(q, k, v, offsets, offsets, longest, longest)           # (N, heads, D)
    return y.reshape(N, H)


ATTEND = {"buckets": attend_buckets, "padded": attend_padded, "nested": attend_nested, "varlen": attend_varlen}
# attention="auto"'s candidates on the CPU; a tie goes to the first. Not "nested": the CPU runs jagged
# SDPA through the math fallback, many times slower than either, and timing it costs most of a second.
CPU_ATTENTION = ("buckets", "padded")
# The two packed batches the CPU route is timed on, as the pipeline's length-sorted batches look:
# short texts in a few neighbouring lengths (one bucket each), and longer ones that all differ.
ROUTE_BATCHES = ((14,) * 10 + (13,) * 12 + (12,) * 10, tuple(range(80, 56, -4)))


def time_attention_routes(num_heads: int, head_dim: int, plan=(), dtype=torch.float32) -> dict:
    """route -> best seconds for one layer's attention over both ROUTE_BATCHES, each route as
    FastEncoder runs it (buckets with the short-group `plan`). The packing, built once per batch and
    shared by every layer in the encoder, is made before the clock starts."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ROUTE_BATCHES:
        lengths = torch.tensor(lengths)
        packing = Packing.from_mask((torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long())  # (B, T) mask
        packing.buckets()
        qkv = torch.randn(packing.num_tokens, 3 * num_heads * head_dim, generator=generator).to(dtype)  # (N, 3H)
        batches.append((qkv, packing))
    attend = {**ATTEND, "buckets": functools.partial(attend_buckets, plan=plan)}
    return kernels.best_times({route: functools.partial(lambda f: [f(qkv, p, num_heads) for qkv, p in batches],
                                                        attend[route]) for route in CPU_ATTENTION},
                              repeats=ATTENTION_REPEATS)


@functools.cache
def choose_attention(num_heads: int, head_dim: int, dtype=torch.float32) -> kernels.Choice:
    """The CPU_ATTENTION route attention="auto" takes on this CPU (measured once, cached; kernels.py)."""
    plan = short_plan(choose_short_attention(num_heads, head_dim, dtype))
    key = f"{kernels.machine_key()} | attention route heads={num_heads} D={head_dim} {str(dtype).removeprefix('torch.')}"
    sizes = " and ".join(f"{len(lengths)} texts of {min(lengths)}-{max(lengths)} tokens" for lengths in ROUTE_BATCHES)
    return kernels.choose("attention route", key, CPU_ATTENTION,
                          lambda: time_attention_routes(num_heads, head_dim, plan, dtype), f"per layer on {sizes}")


def short_plan(bands) -> tuple:
    """choose_short_attention's answer as dense_attention's plan: ((longest, method), ...)."""
    return tuple((longest, choice.route) for longest, choice in bands)


class FastEncoder(nn.Module):
    """BertModel's forward on packed real tokens, with a fused QKV and oneDNN matmuls:

        fast = FastEncoder(model)
        fast(input_ids, attention_mask)   # ≈ model(input_ids, attention_mask), zeros at padding

    It holds the model (shared, not copied) and, per block, the four matmuls as this path runs
    them (`self.linears[i]`: "qkv", "output", "up", "down"; all but the fused "qkv" are the
    model's own Linears, or their int8 copies with int8=True), so that .to() and torch.compile
    see the whole thing. It always computes the model in inference
    mode: no dropout, whatever model.training says (encode() checks that, see model_blocker).

    attention: "auto" (measured on a CPU: choose_attention, `self.attention_choice`), "buckets",
    "padded", "nested" or "varlen" (CUDA, fp16/bf16) (module docstring); an explicit mode is never
    measured over. With "buckets" on the CPU, the short groups' method per band is measured too
    (`self.short_attention`).
    `kernel_report()` lists every choice with the timings that made it. The attention choices are
    measured in the dtype the model has when the FastEncoder is built (a later .to() keeps them).
    onednn (CPU, fp32; None: measured, kernels.choose_matmul, on where oneDNN beats MKL on this
    machine): every matmul runs through oneDNN instead of MKL's sgemm, with the exact GELU
    fused into the up-projection and the residual adds fused into the output and down projections
    (one kernel, no extra pass over the (N, I) activations). prepack (with onednn): each matmul
    weight packed once into oneDNN's layout (`self.packed_weights`, keyed by the Linear), which
    saves a reorder per call on short texts, for a second copy of those weights in memory.
    int8 (CPU): every block's four matmuls through int8 copies of their weights (int8.Int8Linear),
    re-made like the fused QKV whenever the model's weights change; the model is unchanged.
    int8_calibration: int8.calibrate()'s {"<layer>.<matmul>": max |x|}, to smooth each matmul's
    activations with (int8.py); None: no smoothing.
    """

    def __init__(self, model: BertModel, attention: str = "auto", fuse_qkv: bool = True, onednn: bool | None = None,
                 prepack: bool = True, int8: bool = False, int8_calibration: dict | None = None):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        weight = model.embeddings.word_embeddings.weight
        if int8 and weight.device.type != "cpu":
            raise ValueError("int8 matmuls (torch._int_mm with per-token scales) run on the CPU here")
        if attention == "varlen" and (why := varlen_unavailable(weight.device)):
            raise ValueError(why)
        heads, head_dim = model.config.num_attention_heads, model.config.head_dim
        on_cpu = weight.device.type == "cpu"
        self.attention_choice, self.short_attention, self.attention_asked = None, (), attention
        # a bf16 model on the CPU attends in fp32 (module docstring, 5): measure that dtype's routes
        attention_dtype = torch.float32 if on_cpu and weight.dtype == torch.bfloat16 else weight.dtype
        if attention == "auto" and on_cpu:
            # measured once per machine and shape (choose_attention): "buckets" won where it was first
            # measured, but how cheap the per-bucket calls are depends on the CPU
            self.attention_choice = choose_attention(heads, head_dim, attention_dtype)
            attention = self.attention_choice.route
        elif attention == "auto":
            # measured on a GPU (docs/benchmarks.md, section 2): one masked kernel over the re-padded
            # batch wins; per-bucket calls and jagged tensors cost more there
            attention = "padded"
        if attention == "buckets" and on_cpu:
            self.short_attention = choose_short_attention(heads, head_dim, attention_dtype)  # ((longest, Choice), ...)
        self.model = model
        self.int8 = int8
        if int8_calibration is not None and not int8:
            raise ValueError("int8_calibration smooths int8 matmuls: pass int8=True with it")
        self.int8_calibration = int8_calibration
        self.device_type = weight.device.type  # what attention="auto" and onednn=None were decided for
        self.attention = attention
        self.attend = (functools.partial(attend_buckets, plan=short_plan(self.short_attention))
                       if attention == "buckets" else ATTEND[attention])
        self.fuse_qkv = fuse_qkv
        self.matmul_choice = None
        if onednn is None:
            # measured once per machine and model shape (kernels.py): oneDNN only where it beats MKL
            onednn = onednn_kernels.available(weight)
            if onednn:
                config = model.config
                self.matmul_choice = kernels.choose_matmul(config.hidden_size, config.intermediate_size)
                onednn = self.matmul_choice.route == "onednn"
        self.onednn = onednn
        self.prepack = prepack
        self.mixed = False  # a bf16 model on the CPU: bf16 products, fp32 elsewhere (set by sync)
        self.linears, self.built_from, self.packed_weights = None, None, {}
        self.tails = self.heads = None  # compiled block tails and int8 QKV projections, see compile_tails
        self.sync()
        self.eval()

    def __getstate__(self):
        """For copy.deepcopy and pickle: packed oneDNN weights are opaque tensors that can be neither,
        so a copy leaves them behind and re-makes its matmuls on first use (built_from=None)."""
        return {**vars(self), "packed_weights": {}, "built_from": None}

    def kernel_report(self) -> list[tuple[str, str]]:
        """[(what, the route taken and why)] for the fp32 matmuls, the attention route and the
        short-group attention: what `minibge info`, the bench header and the INFO log show."""
        matmul = self.matmul_choice
        if self.mixed:
            rows = [("matmuls", "bf16 products through oneDNN (a bf16 model); fp32 residual stream, LayerNorm and attention")]
        else:
            rows = [("fp32 matmuls", matmul.describe() if matmul is not None
                     else "oneDNN (asked for)" if self.onednn else "F.linear")]
        if self.attention_choice is not None:
            rows.append((self.attention_choice.what, self.attention_choice.describe()))
        else:
            rows.append(("attention route", f"{self.attention} (attention={self.attention_asked!r} on {self.device_type})"))
        rows += [(choice.what, choice.describe()) for _, choice in self.short_attention]
        return rows

    def weight_signature(self) -> list:
        """Identifies the Linears self.linears was made from: which modules (one may have been swapped
        for another), and their weights' storage, in-place version and dtype (the fused QKV is a copy)."""
        return [(id(linear), p.data_ptr(), p._version, p.dtype) for block in self.model.layers
                for linear in (block.attention.query, block.attention.key, block.attention.value,
                               block.attention.output, block.feed_forward.up, block.feed_forward.down)
                for p in linear.parameters()]

    def sync(self, force: bool = False) -> None:
        """(Re)build the per-block matmuls when the model's Linears changed since they were collected
        (an optimizer step bumps a tensor's version, .to() moves its storage, an assignment swaps a
        module): encoding after fine-tuning must not use an old copy. Writes through `.data` do not
        bump the version and go unseen unless force=True (module docstring)."""
        signature = self.weight_signature()
        if force or signature != self.built_from:
            if self.tails is not None:
                # the compiled graphs hold the old matmuls (int8 copies of old weights, or a Linear swapped out)
                logger.warning("the model's weights changed: its compiled block tails are dropped (compile again)")
                self.tails = self.heads = None
            weight = self.model.embeddings.word_embeddings.weight
            self.mixed = weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not self.int8
            self.linears = nn.ModuleList(self.block_linears(i, block) for i, block in enumerate(self.model.layers))
            self.built_from = signature
            # a bf16 model takes oneDNN whatever the fp32 measurement chose: F.linear's bf16 goes to oneDNN
            # too, only without the packed weights and the fused GELU
            self.packed_weights = {linear: onednn_kernels.pack_weight(linear.weight)
                                   for block in self.linears for linear in block.values()
                                   if (self.onednn or self.mixed) and self.prepack and isinstance(linear, nn.Linear)
                                   and onednn_kernels.available(linear.weight, bf16=self.mixed)}

    def block_linears(self, i: int, block) -> nn.ModuleDict:
        """Block i's matmuls as this path runs them: "qkv" (fused) or "query"/"key"/"value", then
        "output", "up", "down"; the model's own Linears, or int8 copies of them with int8=True."""
        attention, ffn = block.attention, block.feed_forward
        linears = {"output": attention.output, "up": ffn.up, "down": ffn.down}
        if self.fuse_qkv:
            linears["qkv"] = fused_qkv(attention)
        else:
            linears.update(query=attention.query, key=attention.key, value=attention.value)
        if self.int8:
            maxima = self.int8_calibration or {}
            # query, key and value read the same input: the fused QKV's maximum serves each
            linears = {name: Int8Linear(linear, maxima.get(f"{i}.{'qkv' if name in QKV_LINEARS else name}"))
                       for name, linear in linears.items()}
        return nn.ModuleDict(linears)

    def matmul(self, linear, x, act=None, residual=None):
        """linear(x), then act(·) or + residual: one oneDNN kernel where it applies, else step by step.
        A bf16 model on the CPU multiplies in bf16 and adds the residual in fp32 (bf16_products)."""
        if self.mixed:
            return bf16_products(linear, x, act, residual, matmul=self.onednn_matmul)
        return self.onednn_matmul(linear, x, act, residual)

    def onednn_matmul(self, linear, x, act=None, residual=None):
        """matmul's fused kernel: oneDNN where this route and dtype take it (fp32; bf16 for a bf16 model)."""
        if ((self.onednn or self.mixed) and type(linear) in (nn.Linear, onednn_kernels.Linear)
                and onednn_kernels.available(x, bf16=self.mixed)):
            fuse_gelu = act is F.gelu  # the exact (erf) GELU: oneDNN's "gelu" post-op with algorithm "none"
            y = onednn_kernels.linear(x, linear.weight, linear.bias, gelu=fuse_gelu, residual=residual,
                                      packed=self.packed_weights.get(linear))
            return act(y) if act is not None and not fuse_gelu else y
        return plain_matmul(linear, x, act, residual)

    def layer(self, i: int, x, packing: Packing, first_only: bool = False):
        """One post-LN block on packed tokens (N, H), using the model's own modules. first_only: the
        outputs of each sentence's first token only, (B, H) (first_tokens)."""
        block = self.model.layers[i]
        # torch.compile specialises sizes 0 and 1, so a single row would compile a new graph (seconds,
        # once): a lone [CLS] row of first_tokens, a one-token text. One row is cheap eagerly.
        qkv = (self.heads[i](x) if self.heads is not None and x.shape[0] > 1
               else project_qkv(self.linears[i], x, self.matmul))  # (N, 3H)
        if self.mixed:
            qkv = qkv.float()  # bf16 products, fp32 attention (module docstring, 5)
        if first_only:
            # every token's keys and values are needed, but only the first tokens' queries, and what
            # follows attention is token-wise: the tail runs on B rows instead of N
            y = attend_first(qkv, packing, block.attention.num_heads)  # (B, H)
            x = x[packing.offsets[:-1]]                                 # (B, H) the first tokens' residual
        else:
            y = self.attend(qkv, packing, block.attention.num_heads)  # (N, H)
        if self.tails is not None and x.shape[0] > 1:
            return self.tails[i](x, y)
        return block_tail(block, self.linears[i], x, y, self.matmul)

    def compile_tails(self) -> float:
        """torch.compile what follows attention in each block (token-wise, so the only shape that
        varies is N: dynamic=True): Inductor calls each matmul as it is (the weights are graph
        inputs) and fuses what surrounds it, bias + GELU and residual + LayerNorm. With int8 matmuls the QKV
        projection before attention is compiled too (`self.heads`): there Inductor fuses what
        surrounds each integer product (the per-token min/max, the rounding, the rescaling, the
        bias, GELU, the residual add and LayerNorm) into a few loops, which eager PyTorch runs as a
        dozen passes over memory. A float QKV stays on the eager oneDNN matmul. Attention stays
        eager: its Python loop over length buckets would break the graph anyway. Returns the compile
        time in seconds (compiled on first calls with dummy batches).

        Not frozen, on purpose, even where the user turned Inductor's freezing on globally. (The
        obvious `torch.compile(options={"freezing": True})` freezes nothing: Dynamo decides whether
        to hand the weights over as constants by reading the global `torch._inductor.config.freezing`
        while it traces, pytorch/pytorch#139272.) Frozen, the int8 graphs would be rewritten by
        Inductor's SmoothQuant pattern into oneDNN's qlinear with signed int8 activations, which runs
        a reference kernel (docs/benchmarks.md), and the fp32 Linears into MKL's packed sgemm, the
        route the fp32 kernel choice (kernels.py) exists to avoid where it is the slower one."""
        start = time.perf_counter()
        # the matmuls as the model is now: after a .to(bf16) (speed_options) the old ones would be
        # rebuilt on the first encode, and the graphs compiled from them dropped
        self.sync()
        # Inductor traces plain Linears, not the oneDNN operator: the tails' packed copies can go
        tail_linears = {linear for block in self.linears for name, linear in block.items() if name in TAIL_LINEARS}
        self.packed_weights = {linear: p for linear, p in self.packed_weights.items() if linear not in tail_linears}
        # every call runs with freezing off, not only the warm-up: a recompile (a new dtype, a
        # reset of Dynamo's cache) happens inside whichever call needs it, and reads the settings then
        unfrozen = torch._inductor.config.patch(freezing=False)
        compiled = lambda f: unfrozen(torch.compile(f, dynamic=True))
        matmul = functools.partial(bf16_products, matmul=plain_matmul) if self.mixed else plain_matmul
        self.tails = [compiled(functools.partial(block_tail, block, linears, matmul=matmul))
                      for block, linears in zip(self.model.layers, self.linears)]
        if self.int8:  # every matmul is int8 then, the QKV projection too
            self.heads = [compiled(functools.partial(project_qkv, linears, matmul=plain_matmul)) for linears in self.linears]
        weight = self.model.embeddings.word_embeddings.weight
        dtype = torch.float32 if self.mixed else weight.dtype  # the residual stream's
        with torch.inference_mode():  # the warm-up: Inductor compiles here, on first calls
            for i in range(len(self.tails)):
                for n in (7, 13):  # two sizes, so the dynamic graph is the one cached
                    x = torch.zeros(n, weight.shape[1], dtype=dtype, device=weight.device)
                    self.tails[i](x, x.clone())  # two tensors: the same one twice is a graph of its own
                    if self.heads is not None:
                        self.heads[i](x)
        return time.perf_counter() - start

    def encode_packed(self, token_ids, packing: Packing, token_type_ids=None, first_only: bool = False):
        """Packed token ids (N,) → final hidden states (N, H), or with first_only those of each
        sentence's first token, (B, H): the last block then computes only what those rows need."""
        types = None if token_type_ids is None else token_type_ids[None]
        positions = packing.positions
        if self.model.config.position_offset:
            # XLM-RoBERTa (model.py): count each sentence's non-<pad> ids from pad_token_id + 1, <pad> gets pad_token_id
            real = token_ids.ne(self.model.config.pad_token_id).long()                                  # (N,)
            counts = real.cumsum(0)                                                                     # (N,)
            before = F.pad(counts, (1, 0))[packing.offsets[:-1]].repeat_interleave(packing.lengths)    # (N,) earlier sentences'
            positions = (counts - before) * real + self.model.config.pad_token_id
        x = self.model.embeddings(token_ids[None], types, position_ids=positions[None])[0]  # (N, H)
        if self.mixed:
            x = x.float()  # the residual stream is fp32 from here on (module docstring, 5)
        last = len(self.model.layers) - 1
        for i in range(last):
            x = self.layer(i, x, packing)
        return self.layer(last, x, packing, first_only)

    def pack_inputs(self, input_ids, attention_mask=None, token_type_ids=None):
        """The model's (B, T) inputs, checked, as packed token ids (N,), their Packing and token types (N,)."""
        self.model.check_inputs(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.sync()
        packing = Packing.from_mask(attention_mask)
        pick = lambda t: None if t is None else t.flatten()[packing.token_index]  # (B, T) → (N,)
        return pick(input_ids), packing, pick(token_type_ids)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """(B, T, H) last hidden state, zeros at padded positions (model() leaves garbage there)."""
        token_ids, packing, types = self.pack_inputs(input_ids, attention_mask, token_type_ids)
        return packing.unpack(self.encode_packed(token_ids, packing, types))

    def first_tokens(self, input_ids, attention_mask=None, token_type_ids=None):
        """(B, H): forward(...)[:, 0], what [CLS] pooling reads, for right-padded batches (position 0
        of every row a real token; a ValueError otherwise), computed with less work.

        Only the [CLS] row of the last block's output is read, and everything in that block but
        attention acts on each token alone, so its out-projection, feed-forward and LayerNorms run
        on B rows instead of N: three quarters of the last block's matmul work, less one row per
        text (attention still reads every token's keys and values). The [CLS] vectors are the same,
        float rounding apart. model.py has no counterpart: like transformers, it returns every row.
        """
        token_ids, packing, types = self.pack_inputs(input_ids, attention_mask, token_type_ids)
        starts = packing.offsets[:-1]                                                  # (B,) first rows
        if not bool((packing.lengths > 0).all()) or bool(packing.positions[starts].any()):
            raise ValueError("first_tokens needs right-padded rows (attention_mask[:, 0] all ones): "
                             "position 0 must be each text's first token")
        return self.encode_packed(token_ids, packing, types, first_only=True)


def plain_matmul(linear, x, act=None, residual=None):
    """The unfused reference for FastEncoder.matmul: linear(x), then act(·), then + residual."""
    y = linear(x)
    if act is not None:
        y = act(y)
    return y if residual is None else y + residual


def bf16_products(linear, x, act=None, residual=None, matmul=plain_matmul):
    """A bf16 model's matmul on the fp32 residual stream: x rounded to bf16, linear(x) and act(·)
    by `matmul` in bf16, then + residual in fp32 (fp32 + bf16 gives fp32). Without a residual the
    output stays bf16: the next matmul reads it as it is, attention casts it back (FastEncoder.layer)."""
    y = matmul(linear, x.to(torch.bfloat16), act)
    return y if residual is None else residual + y


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) in x's dtype: a bf16 model's LayerNorm on the fp32 residual stream, with its weight and
    bias read in fp32 (PyTorch's CPU LayerNorm refuses an fp32 input with bf16 parameters)."""
    if norm.weight is None or norm.weight.dtype == x.dtype:
        return norm(x)
    bias = None if norm.bias is None else norm.bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), bias, norm.eps)


def project_qkv(linears, x, matmul=plain_matmul):
    """(N, H) → (N, 3H): q | k | v side by side, from the fused "qkv" matmul or three."""
    if "qkv" in linears:
        return matmul(linears["qkv"], x)
    return torch.cat([matmul(linears[name], x) for name in ("query", "key", "value")], dim=-1)


def block_tail(block, linears, x, y, matmul=plain_matmul):
    """Everything in a block after attention, all token-wise: out-projection, residual, LayerNorm,
    feed-forward, residual, LayerNorm. x: the block's input (N, H); y: attention's heads (N, H)."""
    x = layer_norm(block.attention_norm, matmul(linears["output"], y, residual=x))
    h = matmul(linears["up"], x, act=block.feed_forward.act)  # (N, I)
    return layer_norm(block.ffn_norm, matmul(linears["down"], h, residual=x))


def fused_qkv(attention) -> nn.Linear:
    """One Linear(H, 3H) whose weight is [W_q; W_k; W_v] (rows stacked), bias [b_q; b_k; b_v]."""
    parts = (attention.query, attention.key, attention.value)
    H = attention.query.in_features
    weight = parts[0].weight
    linear = nn.Linear(H, 3 * H, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.cat([p.weight for p in parts]))
        linear.bias.copy_(torch.cat([p.bias for p in parts]))
    return linear


# -----------------------------------------------------------------------------
# When encode() may take the fast path: only when it computes exactly what the model would

def _stock_modules():
    """The module classes FastEncoder knows how to run (it reads their weights and calls their
    LayerNorms, activations and embeddings; it does not call their forward methods)."""
    from ..model import Embeddings, EncoderLayer, FeedForward, Pooler, SelfAttention
    return (BertModel, Embeddings, EncoderLayer, SelfAttention, FeedForward, Pooler, nn.ModuleList,
            nn.Embedding, nn.LayerNorm, nn.Dropout, nn.Linear, onednn_kernels.Linear)


def model_blocker(model) -> str | None:
    """None when FastEncoder computes `model` exactly; otherwise why it would not.

    The fast path re-implements the forward pass from the model's weights, so a research change
    to the *code* of the model (a subclass, a replaced layer, a patched forward, a hook) would be
    silently skipped by it. encode() asks this first and takes the plain path when the answer is
    not None. Changes to the model's *data* (weights, LayerNorm eps, the activation function,
    pooling) are read by the fast path too and need no plain path.
    """
    if type(model) is not BertModel:
        return f"the model is a {type(model).__name__}, not minibge's BertModel"
    if model.training:
        return "the model is in train mode (dropout on); the fast path computes eval mode only"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered"
    stock = _stock_modules()
    for name, module in model.named_modules():
        where = name or "model"
        if type(module) not in stock:
            return f"{where} is a {type(module).__name__}"
        if "forward" in vars(module):
            return f"{where}.forward was replaced"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{where} has forward hooks"
    if model.attn_impl != "sdpa":
        return f"attn_impl={model.attn_impl!r} asks for the readable attention path"
    return None


# -----------------------------------------------------------------------------
# Optional speed modes: they change the numbers a little, so their STS-B score goes beside their speed

def speed_options(embedder, compile: bool | None = None, precision: str = "fp32", calibration=None):
    """Apply in place: precision "bf16" (the model's weights, which the fast encoder shares, cast to
    bf16: bf16 products on an fp32 residual stream, module docstring 5; only where the CPU has
    native bf16) or "int8" (the fast encoder's matmuls through int8 copies of the weights, int8.py;
    the model stays float32), then torch.compile of the token-wise
    parts (compile=None: on for int8, whose speed comes from the fusion, off otherwise).

    calibration (int8 only): a few hundred texts like those you will encode, or int8.calibrate()'s
    dict, or the path of a file int8.save_calibration() wrote; with it the int8 matmuls are
    smoothed (int8.py), which is what keeps the vectors within 1 − cos 0.005 of fp32 in
    docs/benchmarks.md (without it, a warning says so). The dict used is kept as
    `embedder.fast_encoder.int8_calibration`, to save.
    Returns the embedder, whose encode() now runs the changed path."""
    if precision not in SPEED_PRECISIONS:
        raise ValueError(f"precision must be one of {SPEED_PRECISIONS}, got {precision!r}")
    if calibration is not None and precision != "int8":
        raise ValueError(f"calibration is for precision='int8' (it smooths int8 matmuls), not {precision!r}")
    encoder = embedder.fast_encoder
    if precision == "bf16":
        require_native_bf16(embedder.device, "precision='bf16'")
        encoder.to(torch.bfloat16)
    elif precision == "int8":
        if embedder.device.type != "cpu":
            raise ValueError("int8 matmuls run on the CPU only")
        if isinstance(calibration, (str, os.PathLike)):
            calibration = load_calibration(calibration, len(embedder.model.layers))
        elif calibration is not None and not isinstance(calibration, dict):
            calibration = calibrate(embedder, calibration)  # texts, measured on the float model
        if calibration is None:
            logger.warning("int8 without calibration texts: short texts' vectors can move past 1 − cos 0.005 "
                           "(docs/benchmarks.md); calibration= a few hundred texts like yours smooths the matmuls")
        embedder.use_fast_path(**{**embedder._fast_options, "int8": True, "int8_calibration": calibration})
        encoder = embedder.fast_encoder
    asked, compile = compile, precision == "int8" if compile is None else compile
    if compile:
        try:
            embedder.compile_seconds = encoder.compile_tails()
        except Exception as err:  # Inductor fails in many ways without a working C++ compiler
            if asked is not None:
                raise
            encoder.tails = encoder.heads = None
            raise RuntimeError(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                               "int8 is no faster than fp32 uncompiled (docs/benchmarks.md): pass "
                               "compile=False to run it anyway") from err
        logger.info("torch.compile of %d block tails: %.1f s", len(encoder.tails), embedder.compile_seconds)
    return embedder
