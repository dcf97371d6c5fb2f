"""A faster inference path through the same BertModel: no work on padding, one QKV matmul.

model.py is the readable reference; this file computes the same function with less work and
shares every weight with it (it reads model.py's modules, it never copies their code). Two ideas:

1. Unpadding. A right-padded batch spends most of its FLOPs on [PAD] rows whose outputs are
   thrown away. Every part of a BERT layer except attention acts on each token alone (the
   Linears, GELU, LayerNorm, the residual adds), so I pack the real tokens into one
   (total_tokens, H) matrix and run those parts on it; only attention needs to know which
   tokens form a sentence.

       padded (B=3, T=5)            packed (N = 5 + 2 + 4 = 11, H)
       a a a a a                    a a a a a b b c c c c
       b b ⬚ ⬚ ⬚          ──►       └─ seq 0 ─┘└ 1 ┘└─ 2 ──┘
       c c c c ⬚                    offsets (cu_seqlens) = [0, 5, 7, 11]

   Attention then runs in one of three ways (`attention=`), all the same function:
     "buckets"  group the sentences by exact length; each group is a dense (b, L) batch with no
                mask at all, so SDPA may take its fastest kernel. Best on the CPU, where the
                calls are cheap and batches built by token length have one or two lengths.
     "padded"   scatter q, k, v back into (B, T) and make one masked SDPA call (one kernel).
     "nested"   torch.nested jagged tensors: one SDPA call over ragged sequences, which CUDA
                runs with the variable-length Flash kernel (the CPU falls back to math).
2. A fused QKV projection. The query, key and value Linears read the same input, so one
   (3H, H) matmul does the work of three; the weight [W_q; W_k; W_v] is concatenated once,
   when the FastEncoder is built. A packed row of q|k|v splits into heads by a view:

       (N, 3H) ─view─► (N, 3, heads, D)      (no copy until attention needs (heads, L, D))

FastEncoder is for inference: it skips dropout, and the fused weight is a snapshot, so build
it again after changing the model's weights (or its dtype / device).
"""
import torch
import torch.nn.functional as F

from .model import BertModel

ATTENTION_MODES = ("buckets", "padded", "nested")


class Packing:
    """Where the real tokens of a right-padded (B, T) batch sit once packed into (N, ·)."""

    def __init__(self, attention_mask: torch.Tensor):
        B, T = attention_mask.shape
        self.shape = (B, T)
        self.lengths = attention_mask.sum(dim=1)                                  # (B,)
        self.token_index = attention_mask.flatten().nonzero().squeeze(1)           # (N,) into B*T
        self.offsets = F.pad(self.lengths.cumsum(0), (1, 0))                       # (B+1,) cu_seqlens
        self.positions = self.token_index % T                                      # (N,) 0..len-1 per sentence
        self._buckets = None

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


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(b, L, 3H) → q, k, v, each (b, heads, L, D): views only."""
    b, L, _ = qkv.shape
    q, k, v = qkv.view(b, L, 3, num_heads, -1).unbind(dim=2)  # each (b, L, heads, D)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(b, heads, L, D) → (b·L, H): heads side by side again."""
    b, heads, L, D = y.shape
    return y.transpose(1, 2).reshape(b * L, heads * D)


def attend_buckets(qkv, packing: Packing, num_heads: int):
    """Dense, unmasked SDPA per group of equal-length sentences. qkv (N, 3H) → (N, H)."""
    H = qkv.shape[-1] // 3
    buckets = packing.buckets()
    if len(buckets) == 1:  # every sentence has the same length: the packed matrix *is* a dense batch
        L, _ = buckets[0]
        return merge_heads(F.scaled_dot_product_attention(*split_heads(qkv.view(-1, L, 3 * H), num_heads)))
    out = qkv.new_empty(qkv.shape[0], H)
    for L, rows in buckets:
        y = F.scaled_dot_product_attention(*split_heads(qkv[rows], num_heads))  # (b, heads, L, D)
        out[rows.flatten()] = merge_heads(y)
    return out


def attend_padded(qkv, packing: Packing, num_heads: int):
    """Back to (B, T) for one masked SDPA call, then packed again. qkv (N, 3H) → (N, H)."""
    B, T = packing.shape
    padded = packing.unpack(qkv)                                                    # (B, T, 3H)
    key_mask = (torch.arange(T, device=qkv.device) < packing.lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
    y = F.scaled_dot_product_attention(*split_heads(padded, num_heads), attn_mask=key_mask)
    return merge_heads(y)[packing.token_index]


def attend_nested(qkv, packing: Packing, num_heads: int):
    """One SDPA call over jagged sequences (torch.nested). qkv (N, 3H) → (N, H)."""
    H = qkv.shape[-1] // 3
    # jagged SDPA wants each of q, k, v contiguous once its heads are transposed out
    q, k, v = (torch.nested.nested_tensor_from_jagged(part.contiguous(), packing.offsets)
               .unflatten(-1, (num_heads, H // num_heads)).transpose(1, 2)            # (B, heads, j, D)
               for part in qkv.split(H, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v)                                       # (B, heads, j, D)
    return y.transpose(1, 2).flatten(-2).values()                                     # (N, H)


ATTEND = {"buckets": attend_buckets, "padded": attend_padded, "nested": attend_nested}


class FastEncoder:
    """BertModel's forward on packed real tokens with a fused QKV. Same call, same result:

        fast = FastEncoder(model)
        fast(input_ids, attention_mask)   # ≈ model(input_ids, attention_mask), zeros at padding
    """

    def __init__(self, model: BertModel, attention: str = "buckets", fuse_qkv: bool = True):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if model.training:
            raise ValueError("FastEncoder is for inference: call model.eval() first (it skips dropout)")
        self.model = model
        self.attend = ATTEND[attention]
        self.attention = attention
        self.fuse_qkv = fuse_qkv
        self.qkv = [self.qkv_projection(layer.attention) for layer in model.layers]

    def qkv_projection(self, attention):
        """(weight (3H, H), bias (3H,)) of the fused projection, or the three Linears to call in turn."""
        parts = (attention.query, attention.key, attention.value)
        if not self.fuse_qkv:
            return parts
        with torch.no_grad():
            return (torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts]))

    def project_qkv(self, i: int, x):
        if self.fuse_qkv:
            return F.linear(x, *self.qkv[i])                        # (N, H) → (N, 3H)
        return torch.cat([linear(x) for linear in self.qkv[i]], dim=-1)

    def embed(self, input_ids, packing: Packing, token_type_ids=None):
        """The embedding module on the packed tokens: (N, H), positions restarting per sentence."""
        ids = input_ids.flatten()[packing.token_index]
        types = None if token_type_ids is None else token_type_ids.flatten()[packing.token_index][None]
        return self.model.embeddings(ids[None], types, position_ids=packing.positions[None])[0]

    def layer(self, i: int, x, packing: Packing):
        """One post-LN block on packed tokens (N, H), using the model's own modules."""
        block = self.model.layers[i]
        attention = block.attention
        y = self.attend(self.project_qkv(i, x), packing, attention.num_heads)     # (N, H)
        x = block.attention_norm(x + attention.output(y))
        return block.ffn_norm(x + block.feed_forward(x))

    def packed(self, input_ids, attention_mask=None, token_type_ids=None):
        """(N, H) final hidden states of the real tokens, and their Packing."""
        self.model.check_inputs(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        packing = Packing(attention_mask)
        x = self.embed(input_ids, packing, token_type_ids)
        for i in range(len(self.model.layers)):
            x = self.layer(i, x, packing)
        return x, packing

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        """(B, T, H) last hidden state, zeros at padded positions (model() leaves garbage there)."""
        x, packing = self.packed(input_ids, attention_mask, token_type_ids)
        return packing.unpack(x)
