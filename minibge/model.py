"""The BERT encoder behind BGE, written out by hand, in the order the data flows through it.

BGE (BAAI General Embedding, the C-Pack paper, arXiv 2309.07597) is a plain BERT encoder
(Devlin et al., arXiv 1810.04805) whose sentence embedding is the final hidden state of the
[CLS] token, L2-normalised. The numerical reference is Hugging Face's `modeling_bert.py`;
every choice below matches it, because a BGE checkpoint only works with exactly these:

- embeddings: word + absolute learned position + token type (segment), then LayerNorm, dropout
- post-LN blocks: x = LN(x + Attn(x)); x = LN(x + FFN(x))   (GPT-style pre-LN would be wrong)
- LayerNorm eps 1e-12 (not PyTorch's 1e-5)
- exact erf GELU in the feed-forward (not the tanh approximation GPT-2 code uses)
- bidirectional attention: no causal mask, only a key-padding mask
- separate query/key/value Linears, stored (out, in) like every nn.Linear: no transposes
- token types: BGE passes none, so every token gets row 0 of the token-type table (still added!)
- sentence vector: last_hidden_state[:, 0] (CLS), not the tanh "pooler" (kept only so checkpoints
  load completely); all-MiniLM-style models use a masked mean instead. Then L2 normalisation.

One post-LN encoder layer:

    x ──► Q,K,V ──► softmax(QKᵀ/√d + mask)·V ──► out-proj ──► dropout ──(+x)──► LayerNorm ──► a
    a ──► Linear H→I ──► GELU ──► Linear I→H ──► dropout ──(+a)──► LayerNorm ──► next layer

The padding mask, for a batch of 2 where the second sentence has 2 pad tokens (■ attend, ⬚ not):
every query row sees the same keys, so padded *queries* still produce (meaningless) outputs.

    sentence 0: ■ ■ ■ ■ ■        sentence 1: ■ ■ ■ ⬚ ⬚

XLM-RoBERTa (Conneau et al., arXiv 1911.02116; transformers' `modeling_xlm_roberta.py`), the
encoder of BGE-M3 and the BGE rerankers, is this same network: the same modules, names and
post-LN blocks, so one BertModel runs both, and config.model_type says which. What differs:

- position ids (the trap): not 0..T-1. They count the *real* tokens (ids ≠ pad_token_id),
  starting at padding_idx + 1, and padding gets padding_idx itself. With <pad> = 1:

      ids        <s>  The  cat  </s>  <pad> <pad>
      BERT        0    1    2    3     4     5        (column index, padding or not)
      XLM-R       2    3    4    5     1     1        (transformers' create_position_ids_from_input_ids)

  so rows 0 and 1 of the position table are never used by a real token, and 514 positions hold
  512 tokens (8194 hold M3's 8192). A re-implementation with BERT's rule runs without an error
  and reads every real token's position vector two rows too early: every output is wrong
  (tests/test_xlm_roberta.py checks that such a model fails the comparison).
  The position table has padding_idx = pad_token_id too (its row gets no gradient, as in HF).
- LayerNorm eps 1e-5 (PyTorch's default, not BERT's 1e-12); type_vocab_size 1 (row 0 still added);
  vocabulary 250,002 SentencePiece pieces; <s> ... </s> instead of [CLS] ... [SEP], and pairs
  are <s> A </s></s> B </s>, all segment 0 (tokenizer.py). All of these are data in the config.
- checkpoint names sit under `roberta.` (a ...ForSequenceClassification) or no prefix (weights.py).
- the sentence vector of BGE-M3 is still the first token's state (<s> stands where [CLS] stood).

Loading checkpoints lives in weights.py, text in tokenizer.py/embedder.py: this file is torch only.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import BertConfig

ATTENTION_IMPLEMENTATIONS = ("sdpa", "manual")
# The manual path (and inspect()) materialises the (B, heads, T, Tk) score matrix; SDPA's fused kernel
# never does. One 8,192-token BGE-M3 text has 16·8192² fp32 scores = 4 GiB per layer, so the manual
# path refuses a matrix above this budget rather than exhausting the machine's memory.
MANUAL_ATTENTION_MAX_BYTES = 2 * 1024 ** 3


def activation(name: str):
    """HF's ACT2FN, reduced to what BERT-family configs use."""
    if name == "gelu":
        return F.gelu  # exact: x·Φ(x) with the erf. HF's "gelu" is this one.
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class Embeddings(nn.Module):
    """Token ids (B, T) → vectors (B, T, H): word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        # XLM-RoBERTa gives padding the position padding_idx; its row, like the word table's, gets no gradient
        self.pad_token_id = config.pad_token_id
        self.position_offset = config.position_offset  # 0 (BERT) or pad_token_id + 1 (XLM-RoBERTa)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=config.pad_token_id if self.position_offset else None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        # inputs_embeds lets RetroMAE's decoder feed a sentence vector through the same module
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T, _ = words.shape
        if position_ids is None:
            position_ids = self.position_ids(input_ids, T, words.device)  # (B, T) or (1, T)
        if token_type_ids is None:
            # a classic slip is to skip this term when no segments are given; HF adds row 0
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=words.device)
        x = words + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.norm(x))  # LayerNorm after the three-way sum, then dropout

    def position_ids(self, input_ids, T: int, device) -> torch.Tensor:
        """The position of each token, by the model's rule (module docstring): (1, T) or (B, T) long."""
        if not self.position_offset:
            # BERT: positions are 0..T-1 whatever the padding (no padding_idx offset), which is why
            # right padding is the only padding that leaves real tokens unchanged
            return torch.arange(T, device=device).unsqueeze(0)  # (1, T)
        if input_ids is None:  # vectors fed in directly (RetroMAE's decoder): all real, as transformers assumes
            return torch.arange(self.position_offset, self.position_offset + T, device=device).unsqueeze(0)  # (1, T)
        # XLM-RoBERTa: count the real tokens, from padding_idx + 1; a <pad> id anywhere gets padding_idx.
        # It reads the ids, not the attention mask, exactly as transformers does.
        real = input_ids.ne(self.pad_token_id).long()            # (B, T) 1 = a real token
        return real.cumsum(dim=1) * real + self.pad_token_id     # (B, T) pad+1, pad+2, ... and pad at padding


class SelfAttention(nn.Module):
    """Multi-head attention with two interchangeable inner paths.

    "sdpa"  : torch's fused scaled_dot_product_attention; on CUDA it dispatches to the Flash or
              memory-efficient kernels, which is why we pass attn_mask=None when nothing is padded.
    "manual": the textbook softmax(QKᵀ/√d + mask)·V, one step per line, so you can print the
              attention probabilities and step through them.
    Both compute the same function; they differ only by float rounding (a few 1e-6 in fp32).
    """

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_prob = config.attention_probs_dropout_prob
        H = config.hidden_size
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.output = nn.Linear(H, H)

    def split_heads(self, x):
        B, T, _ = x.shape
        # heads come from viewing each projection as (H_heads, D): the HF layout. A fused QKV would
        # have to concatenate [Wq; Wk; Wv] along the output dim to keep this split.
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)

    def forward(self, hidden, mask=None, key_value_states=None, need_probs=False, score_bias=None):
        """hidden: (B, T, H); mask: bool, broadcastable to (B, heads, T, Tk), True = attend, or None.

        key_value_states (B, Tk, H) makes this cross-attention (RetroMAE's decoder reads keys and
        values from a different stream than its queries); by default it is self-attention.
        score_bias: the research hook, a float tensor broadcastable to (B, heads, T, Tk) added to
        the scaled scores QKᵀ/√d before the softmax (ALiBi slopes, a relative-position table, ...).
        Returns (output (B, T, H), attention probabilities (B, heads, T, Tk) or None).
        """
        kv = hidden if key_value_states is None else key_value_states
        q = self.split_heads(self.query(hidden))  # (B, heads, T, D)
        k = self.split_heads(self.key(kv))        # (B, heads, Tk, D)
        v = self.split_heads(self.value(kv))      # (B, heads, Tk, D)
        dropout_p = self.dropout_prob if self.training else 0.0  # no dropout at inference

        probs = None
        if self.attn_impl == "sdpa" and not need_probs:
            # is_causal stays False: an encoder sees both directions (nanoGPT's is_causal=True is a trap here).
            # The scale is SDPA's default 1/sqrt(D); pre-scaling q as well would scale twice.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.sdpa_mask(mask, score_bias, q.dtype),
                                               dropout_p=dropout_p)  # (B, heads, T, D)
        else:
            check_score_matrix_size(q, k)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, heads, T, D) x (B, heads, D, Tk) -> (B, heads, T, Tk)
            if score_bias is not None:
                scores = scores + score_bias  # added after the 1/√d scaling, as SDPA adds a float attn_mask
            if mask is not None:
                # HF adds finfo.min at masked keys; filling with it gives the same exp() = 0.
                # -inf would also work, except that a fully masked row would then turn into NaN.
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)  # in the activation dtype, as HF does (no fp32 upcast)
            y = F.dropout(probs, p=dropout_p) @ v  # (B, heads, T, Tk) x (B, heads, Tk, D) -> (B, heads, T, D)
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H): heads side by side again
        return self.output(y), probs

    @staticmethod
    def sdpa_mask(mask, score_bias, dtype):
        """SDPA takes one attn_mask: a bool (True = attend) or a float added to the scores. With a
        score bias, I fold the padding mask into it as finfo.min, the manual path's fill value."""
        if score_bias is None:
            return mask
        bias = score_bias.to(dtype)
        if mask is not None:  # torch.where broadcasts both ways: (B, 1, 1, Tk) mask, (1, heads, T, Tk) bias
            bias = torch.where(mask, bias, torch.finfo(dtype).min)
        return bias


def check_score_matrix_size(q, k) -> None:
    """Refuse, before allocating it, a (B, heads, T, Tk) score matrix over MANUAL_ATTENTION_MAX_BYTES."""
    B, heads, T, _ = q.shape
    size = B * heads * T * k.shape[2] * q.element_size()
    if size > MANUAL_ATTENTION_MAX_BYTES:
        raise ValueError(f"the manual attention path (attn_impl='manual', or inspect()) would build a "
                         f"{(B, heads, T, k.shape[2])} score matrix of {size / 2**30:.1f} GiB, over its budget of "
                         f"{MANUAL_ATTENTION_MAX_BYTES / 2**30:.1f} GiB (model.MANUAL_ATTENTION_MAX_BYTES); use the "
                         f"fused path, attn_impl='sdpa' (model.set_attn_impl('sdpa')), which never builds it")


class FeedForward(nn.Module):
    """Position-wise MLP: H → I → H with GELU (HF calls the two halves `intermediate` and `output`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.down(self.act(self.up(x)))  # (B, T, H) -> (B, T, I) -> (B, T, H)


class EncoderLayer(nn.Module):
    """One post-LN transformer block: LayerNorm comes *after* each residual addition."""

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.attention = SelfAttention(config, attn_impl)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, mask=None, key_value_states=None, need_probs=False, score_bias=None):
        attended, probs = self.attention(x, mask, key_value_states, need_probs, score_bias)
        x = self.attention_norm(x + self.dropout(attended))       # dropout, add, then normalise
        # the FFN's residual is the attention block's *normalised* output, not the layer input
        x = self.ffn_norm(x + self.dropout(self.feed_forward(x)))
        return x, probs


class Pooler(nn.Module):
    """BERT's next-sentence-prediction head input: tanh(W·h_CLS + b). BGE does NOT use it for
    embeddings; it exists so official checkpoints load completely and save back unchanged."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, H) -> (B, H)


class EncoderOutput(NamedTuple):
    """What BertModel.inspect returns."""
    last_hidden_state: torch.Tensor                 # (B, T, H)
    hidden_states: Optional[tuple] = None           # L + 1 tensors (B, T, H): embeddings, then each layer
    attentions: Optional[tuple] = None              # L tensors (B, heads, T, T) of softmax probabilities


class BertModel(nn.Module):
    """The encoder: Embeddings → L × EncoderLayer (→ Pooler, only when pooler_output is called).

    model(input_ids, attention_mask, token_type_ids)   → last hidden state (B, T, H), always
    model.inspect(input_ids, attention_mask, ...)      → EncoderOutput with every layer's output
    model.pooler_output(last_hidden_state)             → BERT's tanh pooler (B, H); not BGE's embedding
    """

    def __init__(self, config: BertConfig, attn_impl: str = "sdpa", add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, attn_impl) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config) if add_pooler else None
        # As transformers' BertEncoder.gradient_checkpointing: in train mode, each layer keeps only its
        # input and recomputes the rest in backward (less memory, the same gradients). A flag, not a
        # patched forward, so the fast path's gate still sees a stock model.
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @property
    def attn_impl(self) -> str:
        return self.layers[0].attention.attn_impl

    def set_attn_impl(self, attn_impl: str) -> "BertModel":
        """Switch every layer between "sdpa" and "manual" (same weights, same function)."""
        if attn_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {attn_impl!r}")
        for layer in self.layers:
            layer.attention.attn_impl = attn_impl
        return self

    def _init_weights(self, module):
        """HF's init, for training from scratch (loading a checkpoint overwrites all of it):

        Linear, Embedding weights   normal(0, initializer_range = 0.02)
        Linear biases               0
        Embedding padding row       0   (so [PAD] contributes nothing before LayerNorm)
        LayerNorm weight / bias     1 / 0
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_inputs(self, input_ids, attention_mask, token_type_ids):
        """User mistakes become ValueErrors here rather than an index error deep inside an embedding."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a 2-D torch.long tensor (batch, seq_len), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"of shape {tuple(getattr(input_ids, 'shape', ()))}")
        B, T = input_ids.shape
        if T > cfg.max_sequence_length:  # max_position_embeddings, less XLM-RoBERTa's offset (config.py)
            raise ValueError(f"sequence length {T} exceeds the model's {cfg.max_sequence_length} positions "
                             f"(max_position_embeddings {cfg.max_position_embeddings}); truncate the input "
                             "(the tokenizer does this when given max_length)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got min {input_ids.min().item()}, "
                             f"max {input_ids.max().item()} (wrong tokenizer for this model?)")
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (B, T)):
                raise ValueError(f"{name} must be a tensor with the shape of input_ids {(B, T)}, "
                                 f"got {tuple(getattr(tensor, 'shape', ())) or type(tensor).__name__}")
        if attention_mask is not None:
            check_padding_mask(attention_mask)
        if token_type_ids is not None and token_type_ids.numel() and \
                (token_type_ids.min() < 0 or token_type_ids.max() >= cfg.type_vocab_size):
            raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size})")

    def run_layers(self, input_ids, attention_mask=None, token_type_ids=None, attention_bias=None, need_probs=False):
        """The whole encoder, yielding what comes out of the embeddings and then of each layer."""
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # (B, T) → (B, 1, 1, T) bool, True = attend: one row per sentence, broadcast over heads and
            # query positions. All-ones masks stay None so SDPA may pick its fastest kernel.
            mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        yield x, None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # non-reentrant: dropout is replayed with the saved RNG state
                x, probs = checkpoint(layer, x, mask, need_probs=need_probs, score_bias=attention_bias,
                                      use_reentrant=False)
            else:
                x, probs = layer(x, mask, need_probs=need_probs, score_bias=attention_bias)
            yield x, probs

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, attention_bias=None):
        """input_ids (B, T) long; attention_mask (B, T) of 0/1 (bool or integer), 1 = token, 0 = padding;
        token_type_ids (B, T); attention_bias: optional float, broadcastable to (B, heads, T, T), added
        to every layer's attention scores. Returns the last hidden state (B, T, H).

        Unlike transformers' BertModel, which returns an output object, this is always one tensor:
        `model(ids, mask)[0]` is the first sentence's token vectors, never "the last hidden state".
        """
        for x, _ in self.run_layers(input_ids, attention_mask, token_type_ids, attention_bias):
            pass
        return x

    def inspect(self, input_ids, attention_mask=None, token_type_ids=None, attention_bias=None) -> "EncoderOutput":
        """Everything inside, for looking rather than training: the hidden state after the embeddings
        and after each layer (L + 1 tensors, as transformers' output_hidden_states), and each layer's
        attention probabilities (L tensors (B, heads, T, T); these come from the manual path, since
        the fused kernel never materialises them)."""
        outputs = list(self.run_layers(input_ids, attention_mask, token_type_ids, attention_bias, need_probs=True))
        hidden_states = tuple(x for x, _ in outputs)
        attentions = tuple(probs for _, probs in outputs[1:])
        return EncoderOutput(hidden_states[-1], hidden_states, attentions)

    def pooler_output(self, last_hidden_state):
        """transformers' `pooler_output`: tanh(W·h_CLS + b), (B, T, H) → (B, H). BGE's embedding is
        the CLS vector *before* this head; the pooler is what BERT's next-sentence task trained."""
        if self.pooler is None:
            raise ValueError("this model has no pooler: its checkpoint carried no pooler.dense weights")
        return self.pooler(last_hidden_state)


def check_padding_mask(attention_mask):
    """A padding mask holds 0/1 (bool or integer). Anything else, most often transformers' *additive*
    mask (0 for tokens, -10000 or finfo.min for padding), would be silently misread by `.bool()`."""
    if attention_mask.dtype == torch.bool:
        return

    def additive_hint():  # only worked out once the mask is known to be wrong: forward() stays cheap
        looks_additive = bool((attention_mask <= 0).all()) and bool((attention_mask < 0).any())
        return (" It looks like transformers' additive mask (0 = attend, a large negative number = padding);"
                " pass the tokenizer's 0/1 attention_mask instead.") if looks_additive else ""

    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must be bool or integer 0/1 (1 = real token, 0 = padding), got dtype "
                         f"{attention_mask.dtype}." + (additive_hint() or " Convert a 0./1. mask with .long()."))
    if attention_mask.numel() and (attention_mask.min() < 0 or attention_mask.max() > 1):
        raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real token, 0 = padding), got values in "
                         f"[{attention_mask.min().item()}, {attention_mask.max().item()}]." + additive_hint())


# -----------------------------------------------------------------------------
# From token vectors to one sentence vector

def cls_pool(hidden, attention_mask=None):
    """BGE: the [CLS] token's final hidden state. (B, T, H) -> (B, H). Right padding keeps CLS at 0."""
    return hidden[:, 0]


def mean_pool(hidden, attention_mask):
    """all-MiniLM / sentence-transformers "mean": average over real tokens only. (B, T, H) -> (B, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)                   # (B, H)
    count = weights.sum(dim=1).clamp(min=1e-9)               # (B, 1); the clamp is sentence-transformers'
    return summed / count


POOLING = {"cls": cls_pool, "mean": mean_pool}


def l2_normalize(x, eps=1e-12):
    """Unit-length rows, so a dot product is a cosine similarity (F.normalize, as BGE and ST use)."""
    return F.normalize(x, p=2, dim=-1, eps=eps)


# -----------------------------------------------------------------------------
# Work done by one forward pass (as nanoGPT's estimate_mfu sits beside its model)

def encoder_flops(config, lengths) -> float:
    """Useful FLOPs of one forward pass of the encoder over texts of these token lengths.

    A (n × k) @ (k × m) matmul costs 2·n·k·m FLOPs (one multiply, one add per term). For a text of
    n real tokens, each of the L layers does:

        Q, K, V, out-projection   4 Linears H→H      2·n·4H²
        feed-forward              H→I and I→H        2·n·2HI
        attention scores  QKᵀ     (n × H)·(H × n)    2·n²·H    (summed over heads: heads·d = H)
        weighted values   P·V     (n × n)·(n × H)    2·n²·H

    so L·(2·n·(4H² + 2HI) + 4·n²·H) in all. Only real tokens count: padding is work a batch
    layout wastes, not work the text needs, so every implementation is charged the same. Left out
    as small next to these: embeddings, LayerNorm, GELU, softmax, biases, the pooler.
    """
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return float(sum(L * (2 * n * (4 * H * H + 2 * H * I) + 4 * n * n * H) for n in map(int, lengths)))
