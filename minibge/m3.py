"""BGE-M3: dense, lexical (sparse) and multi-vector (ColBERT) retrieval from one forward pass.

BGE-M3 (Chen et al. 2024, arXiv 2402.03216) is an XLM-RoBERTa encoder (model.py, 8194 positions:
8192 tokens) with two small heads beside it. One forward pass gives the last hidden state
h (B, T, H); each output is a few lines on top of it, as FlagEmbedding's M3 computes them:

    dense     e = h[:, 0] / ‖h[:, 0]‖                         the <s> state, unit length   (B, H)
    lexical   w_t = relu(sparse_linear(h_t))                  one weight per token          (B, T)
              w(v) = max over the text's tokens t with id v of w_t, for each token id v,
              special tokens (<s>, </s>, <pad>, <unk>) dropped  →  {"id": weight}
    ColBERT   c_t = colbert_linear(h_t) / ‖·‖  for t = 1..n−1  (<s> dropped, </s> kept)  (B, T−1, H)

and three scores between a query q and a passage p:

    s_dense   = e_q · e_p
    s_lex     = Σ_{v in both texts} w_q(v) · w_p(v)                       (the lexical matching score)
    s_mul     = 1/N_q · Σ_{i ≤ N_q} max_{j ≤ N_p} c_q,i · c_p,j           (late interaction, N = ColBERT vectors)

combined with weights (w1, w2, w3) for (dense, sparse, colbert) as FlagEmbedding's compute_score
returns them: "sparse+dense" = (w2·s_lex + w1·s_dense)/(w1 + w2) and "colbert+sparse+dense" =
(w3·s_mul + w2·s_lex + w1·s_dense)/(w1 + w2 + w3), default weights [1, 1, 1].

The checkpoint is the official folder (BAAI/bge-m3): config.json (XLMRobertaModel) and
model.safetensors or pytorch_model.bin for the encoder (weights.py's checked loader), plus
colbert_linear.pt (Linear H→H) and sparse_linear.pt (Linear H→1), two torch.save'd state dicts
({"weight", "bias"}) read with torch.load(weights_only=True) and checked like every other tensor.
A folder without a head still loads; asking for that head's output is then a clear error. For
fine-tuning (train/m3.py) missing heads are made fresh, as FlagEmbedding makes them: nn.Linear's
own default initialisation.

Where re-implementations (and FlagEmbedding's own two code paths) diverge, and what I chose:
- the special tokens dropped from the lexical weights are the tokenizer's cls, sep, pad and unk
  tokens (FlagEmbedding: cls, eos, pad, unk; for XLM-R, sep = eos = </s>, the same four ids);
- weights ≤ 0 never enter a dict (relu makes most weights exactly 0: that is the sparsity);
- ColBERT's max runs over the passage's real tokens only. FlagEmbedding's batched compute_score
  lets the zero vectors of a padded passage take part in the max (so a query token whose best real
  match is negative scores 0, depending on what else is in the batch); its colbert_score on
  encode()'s output, which I follow, has no padding to see.
- dense and ColBERT vectors are float32 numpy arrays; lexical weights are Python floats.
"""
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .common import atomic_folder
from .config import BertConfig
from .embedder import Embedder, as_text_list, positive_int
from .hub import is_hub_id, resolve_model_path
from .model import BertModel, cls_pool, l2_normalize
from .tokenizer import Tokenizer
from .weights import _write_model_files, copy_checked, load_model

logger = logging.getLogger(__name__)

HEAD_FILES = {"colbert": "colbert_linear.pt", "sparse": "sparse_linear.pt"}
SCORE_MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
OUTPUT_KEYS = ("dense_vecs", "lexical_weights", "colbert_vecs")


# -----------------------------------------------------------------------------
# The three outputs, from the last hidden state h (B, T, H)

def dense_embedding(hidden: torch.Tensor) -> torch.Tensor:
    """e = h[:, 0] / ‖h[:, 0]‖: the <s> token's state, unit length. (B, T, H) → (B, H)."""
    return l2_normalize(cls_pool(hidden))


def token_weights(sparse_linear: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """w_t = relu(sparse_linear(h_t)): one non-negative weight per token. (B, T, H) → (B, T)."""
    return torch.relu(sparse_linear(hidden)).squeeze(-1)


def lexical_weights(weights, ids, unused_ids) -> dict:
    """One text's token weights (n,) and ids (n,) → {"token id": weight}: per id the largest weight
    of its occurrences, special ids and zero weights left out (FlagEmbedding keys ids as strings)."""
    result = {}
    for w, i in zip(weights.tolist(), ids.tolist()):
        key = str(i)
        if i not in unused_ids and w > 0 and w > result.get(key, 0.0):
            result[key] = w
    return result


def sparse_embedding(weights: torch.Tensor, input_ids: torch.Tensor, vocab_size: int, unused_ids) -> torch.Tensor:
    """The same weights as a (B, V) vector over the vocabulary, differentiable, for training:
    entry v is max_t w_t over the tokens with id v (0 where v is absent), special ids zeroed.
    Padding (id <pad>) lands in a zeroed column. (B, T) → (B, V)."""
    empty = weights.new_zeros(weights.shape[0], vocab_size)                               # (B, V)
    vectors = empty.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)  # max with 0: w ≥ 0 anyway
    keep = torch.ones(vocab_size, dtype=weights.dtype, device=weights.device)
    keep[list(unused_ids)] = 0.0
    return vectors * keep                                                                 # (B, V)


def colbert_embedding(colbert_linear: nn.Linear, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """c_t = colbert_linear(h_t) / ‖·‖ for t ≥ 1 (<s> carries the dense vector and is dropped);
    padded positions are zero vectors. (B, T, H) → (B, T−1, D)."""
    vecs = colbert_linear(hidden[:, 1:]) * attention_mask[:, 1:, None].to(hidden.dtype)  # (B, T-1, D)
    return l2_normalize(vecs)  # F.normalize leaves a zero vector zero (its eps)


# -----------------------------------------------------------------------------
# Scores

def dense_score(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """s_dense = e_q · e_p for every query and passage: (Bq, H), (Bp, H) → (Bq, Bp)."""
    return q @ p.T


def sparse_score(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """s_lex on (B, V) sparse_embedding vectors: the dot product sums w_q(v)·w_p(v) over shared ids. → (Bq, Bp)."""
    return q @ p.T


def lexical_matching_score(weights_1: dict, weights_2: dict) -> float:
    """s_lex on two {token: weight} dicts: Σ over the tokens in both of the product of weights."""
    return float(sum(w * weights_2[t] for t, w in weights_1.items() if t in weights_2))


def colbert_score(q: torch.Tensor, p: torch.Tensor, q_mask: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """s_mul = 1/N_q Σ_i max_j c_q,i · c_p,j, every query against every passage.

    q (Bq, Tq, D), p (Bp, Tp, D) ColBERT vectors, q_mask (Bq, Tq) / p_mask (Bp, Tp) 1 at real
    vectors (attention_mask[:, 1:]). Returns (Bq, Bp).
    """
    sim = torch.einsum("aid,bjd->abij", q, p)                                       # (Bq, Bp, Tq, Tp)
    sim = sim.masked_fill(~p_mask.bool()[None, :, None, :], float("-inf"))          # only real passage tokens
    best = sim.max(dim=-1).values * q_mask[:, None, :].to(sim.dtype)               # (Bq, Bp, Tq), padded queries 0
    return best.sum(dim=-1) / q_mask.sum(dim=-1, keepdim=True).to(sim.dtype)       # (Bq, Bp)


def combine_scores(dense, sparse, colbert, weights=None) -> dict:
    """The five score lists of FlagEmbedding's compute_score from the three per-pair scores.
    weights: [w_dense, w_sparse, w_colbert], default [1, 1, 1]."""
    w1, w2, w3 = (1.0, 1.0, 1.0) if weights is None else check_mode_weights(weights)
    dense, sparse, colbert = (np.asarray(x, dtype=np.float64) for x in (dense, sparse, colbert))
    return {"colbert": colbert.tolist(), "sparse": sparse.tolist(), "dense": dense.tolist(),
            "sparse+dense": ((w2 * sparse + w1 * dense) / (w1 + w2)).tolist(),
            "colbert+sparse+dense": ((w3 * colbert + w2 * sparse + w1 * dense) / (w1 + w2 + w3)).tolist()}


def check_mode_weights(weights) -> tuple:
    if not isinstance(weights, (list, tuple)) or len(weights) != 3 or \
            not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ValueError(f"weights_for_different_modes must be 3 numbers [dense, sparse, colbert], got {weights!r}")
    if weights[0] + weights[1] == 0 or sum(weights) == 0:
        raise ValueError(f"weights_for_different_modes {list(weights)}: the sums it divides by must not be 0")
    return tuple(float(w) for w in weights)


# -----------------------------------------------------------------------------
# The model: encoder + two heads

class M3Model(nn.Module):
    """BertModel (XLM-R for BGE-M3) + colbert_linear (H→D) + sparse_linear (H→1); a head may be None
    (a folder without its file), and asking for its output is then an error naming the file."""

    def __init__(self, encoder: BertModel, colbert_linear: nn.Linear | None, sparse_linear: nn.Linear | None,
                 unused_ids=(), source: str = "model"):
        super().__init__()
        self.encoder = encoder
        self.config: BertConfig = encoder.config
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.unused_ids = frozenset(int(i) for i in unused_ids)
        self.source = source

    def head(self, name: str) -> nn.Linear:
        linear = self.colbert_linear if name == "colbert" else self.sparse_linear
        if linear is None:
            raise ValueError(f"{self.source} has no {HEAD_FILES[name]}, so it has no {name} output; ask for "
                             f"the outputs it has, or fine-tune heads onto it (minibge finetune-m3)")
        return linear

    def forward(self, input_ids, attention_mask, outputs=("dense", "sparse", "colbert")) -> dict:
        """The differentiable path, for training: {"dense": (B, H), "sparse": (B, V), "colbert": (B, T-1, D)}."""
        hidden = self.encoder(input_ids, attention_mask)  # (B, T, H)
        out = {}
        if "dense" in outputs:
            out["dense"] = dense_embedding(hidden)
        if "sparse" in outputs:
            out["sparse"] = sparse_embedding(token_weights(self.head("sparse"), hidden), input_ids,
                                             self.config.vocab_size, self.unused_ids)
        if "colbert" in outputs:
            out["colbert"] = colbert_embedding(self.head("colbert"), hidden, attention_mask)
        return out

    def save_pretrained(self, directory, tokenizer: Tokenizer | None = None) -> Path:
        """The official layout, written into a temporary folder renamed into place: config.json +
        model.safetensors (weights.py), colbert_linear.pt and sparse_linear.pt (the heads it has,
        as state dicts of plain tensors), and the tokenizer when given."""
        directory = Path(directory)
        for name, linear in (("colbert", self.colbert_linear), ("sparse", self.sparse_linear)):
            if linear is None and (directory / HEAD_FILES[name]).exists():  # it would survive beside new weights
                raise ValueError(f"{directory} holds a {HEAD_FILES[name]} and this model has no {name} head; "
                                 "save to a new folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(directory) as partial:
            _write_model_files(self.encoder, partial, None, None, "", None)
            for name, linear in (("colbert", self.colbert_linear), ("sparse", self.sparse_linear)):
                if linear is not None:
                    state = {k: v.detach().cpu().contiguous().clone() for k, v in linear.state_dict().items()}
                    torch.save(state, partial / HEAD_FILES[name])
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
        return directory


def read_head(path: Path, in_features: int, name: str) -> nn.Linear:
    """A torch.save'd Linear state dict → nn.Linear, read as untrusted (weights_only) and checked."""
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; minibge reads head files only as regular files")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or hostile pickle
        raise ValueError(f"could not read {path} (it must be a state dict of tensors): {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("weight"), torch.Tensor) or state["weight"].dim() != 2:
        raise ValueError(f"{path} must hold a Linear's state dict {{'weight': (out, {in_features}), 'bias': (out,)}}")
    out_features = 1 if name == "sparse" else state["weight"].shape[0]  # ColBERT's width is the file's (H in BGE-M3)
    linear = nn.Linear(in_features, out_features)
    copy_checked(linear, state, str(path), what=f"the {name} head Linear({in_features}, {out_features})")
    return linear


def fresh_head(hidden_size: int, name: str) -> nn.Linear:
    """A new head as FlagEmbedding makes one when the folder has none: nn.Linear's default init."""
    return nn.Linear(hidden_size, hidden_size if name == "colbert" else 1)


def special_ids(tokenizer: Tokenizer) -> set:
    """The ids whose weights the lexical output drops: cls, sep (= eos in XLM-R), pad, unk."""
    ids = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    unk = tokenizer._tok.token_to_id(tokenizer.specials["unk_token"])
    return ids | ({unk} if unk is not None else set())


def load_m3_model(path, tokenizer: Tokenizer, attn_impl: str = "sdpa", device=None, dtype=None,
                  fresh_heads: bool = False) -> M3Model:
    """A folder → M3Model in eval mode: the encoder through weights.load_model, each head file checked;
    a missing head is None, or fresh (random) with fresh_heads (for fine-tuning)."""
    directory = Path(path)
    encoder = load_model(directory, attn_impl=attn_impl)  # refuses an unfinished training run's folder too
    heads = {}
    for name, filename in HEAD_FILES.items():
        file = directory / filename
        if file.exists() or file.is_symlink():
            heads[name] = read_head(file, encoder.config.hidden_size, name)
        elif fresh_heads:
            heads[name] = fresh_head(encoder.config.hidden_size, name)
            logger.info("%s has no %s: a fresh %s head (nn.Linear's init); fine-tune it", directory, filename, name)
        else:
            heads[name] = None
            logger.info("%s has no %s: the %s output is unavailable", directory, filename, name)
    model = M3Model(encoder, heads["colbert"], heads["sparse"], special_ids(tokenizer), source=str(directory))
    return model.to(device=device, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# Texts in, the three outputs out: the Embedder's pipeline plus the heads

class M3Embedder:
    """A tokenizer + an M3Model. encode() batches exactly as Embedder.encode (length-sorted windows,
    the fast backend where it applies) and applies the heads to each text's real tokens."""

    def __init__(self, model: M3Model, tokenizer: Tokenizer, max_length: int | None = None,
                 name: str = "model", fast: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.embedder = Embedder(model.encoder, tokenizer, pooling="cls",
                                 max_length=max_length or model.config.max_sequence_length, name=name, fast=fast)
        self.name = name

    def __repr__(self):
        heads = [n for n in ("colbert", "sparse") if getattr(self.model, f"{n}_linear") is not None]
        return f"M3Embedder({self.name!r}, heads={heads}, max_length={self.embedder.max_length})"

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    @property
    def max_length(self) -> int:
        return self.embedder.max_length

    def encode(self, sentences, batch_size: int = 256, max_length: int | None = None, return_dense: bool = True,
               return_sparse: bool = False, return_colbert_vecs: bool = False,
               show_progress_bar: bool | None = None) -> dict:
        """Texts → {"dense_vecs": (N, H) float32 | None, "lexical_weights": [{"id": w}] | None,
        "colbert_vecs": [(n_i − 1, D) float32] | None}, in input order; a str gives one item each."""
        single = isinstance(sentences, str)
        texts = as_text_list([sentences] if single else sentences)
        if not (return_dense or return_sparse or return_colbert_vecs):
            raise ValueError("ask for at least one of return_dense, return_sparse, return_colbert_vecs")
        colbert = self.model.head("colbert") if return_colbert_vecs else None  # a missing head fails here, first
        sparse = self.model.head("sparse") if return_sparse else None
        dense_vecs = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32) if return_dense else None
        lexical, multi = [None] * len(texts), [None] * len(texts)
        max_length = self.embedder.length_limit(max_length)
        batches = self.embedder.iter_batches(texts, positive_int(batch_size, "batch_size"), max_length,
                                             show_progress_bar=show_progress_bar, output_value="token_embeddings")
        for members, hidden in batches:  # hidden: per text its real tokens' states (n_i, H), float32
            # the pipeline yields states, not ids: the batch's ids again (the same call, so the same ids)
            ids = self.tokenizer.encode_batch([texts[i] for i in members], max_length) if sparse is not None else None
            with torch.inference_mode():
                for k, (i, h) in enumerate(zip(members.tolist(), hidden)):
                    h = h[None].to(self.model.encoder.embeddings.word_embeddings.weight.dtype)  # (1, n, H) in the heads' dtype
                    if return_dense:
                        dense_vecs[i] = dense_embedding(h)[0].float().cpu().numpy()
                    if sparse is not None:
                        weights = token_weights(sparse, h)[0].float().cpu()                   # (n,)
                        lexical[i] = lexical_weights(weights, torch.tensor(ids[k]), self.model.unused_ids)
                    if colbert is not None:
                        mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
                        multi[i] = colbert_embedding(colbert, h, mask)[0].float().cpu().numpy()  # (n-1, D)
        out = {"dense_vecs": dense_vecs, "lexical_weights": lexical if return_sparse else None,
               "colbert_vecs": multi if return_colbert_vecs else None}
        if single:
            out = {k: (None if v is None else v[0]) for k, v in out.items()}
        return out

    def convert_id_to_token(self, lexical: dict | list) -> dict | list:
        """{"id": weight} → {"piece": weight}: the decoded text of each id (several ids may decode alike;
        the later one wins, as in FlagEmbedding)."""
        items = [lexical] if isinstance(lexical, dict) else lexical
        converted = [{self.tokenizer._tok.decode([int(i)]): w for i, w in item.items()} for item in items]
        return converted[0] if isinstance(lexical, dict) else converted

    def compute_score(self, sentence_pairs, batch_size: int = 256, max_query_length: int = 512,
                      max_passage_length: int = 512, weights_for_different_modes=None) -> dict:
        """Per (query, passage) pair the three scores and their two combinations (combine_scores);
        a dict of lists, or of floats for one pair."""
        single = isinstance(sentence_pairs, (list, tuple)) and len(sentence_pairs) == 2 \
            and all(isinstance(t, str) for t in sentence_pairs)
        pairs = [sentence_pairs] if single else list(sentence_pairs)
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise TypeError("sentence_pairs must be a (query, passage) pair or a list of them")
        if weights_for_different_modes is not None:
            check_mode_weights(weights_for_different_modes)
        every = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
        q = self.encode([a for a, _ in pairs], batch_size, max_query_length, **every)
        p = self.encode([b for _, b in pairs], batch_size, max_passage_length, **every)
        dense = np.einsum("nh,nh->n", q["dense_vecs"], p["dense_vecs"])
        sparse = [lexical_matching_score(a, b) for a, b in zip(q["lexical_weights"], p["lexical_weights"])]
        colbert = [float((a @ b.T).max(axis=1).mean()) for a, b in zip(q["colbert_vecs"], p["colbert_vecs"])]
        scores = combine_scores(dense, sparse, colbert, weights_for_different_modes)
        return {k: v[0] for k, v in scores.items()} if single else scores

    def save_pretrained(self, directory) -> Path:
        """The official M3 folder (M3Model.save_pretrained) with this tokenizer."""
        return self.model.save_pretrained(directory, self.tokenizer)


def load_m3(name_or_path, device=None, dtype=None, attn_impl: str = "sdpa", max_length: int | None = None,
            fast: bool = True, fresh_heads: bool = False) -> M3Embedder:
    """An official BGE-M3 folder (or Hub id) → M3Embedder. Heads missing from the folder: the outputs
    that need them raise ValueError; fresh_heads=True makes new ones instead (for fine-tuning)."""
    folder = resolve_model_path(name_or_path) if is_hub_id(str(name_or_path)) else Path(name_or_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = Tokenizer.from_pretrained(folder)
    model = load_m3_model(folder, tokenizer, attn_impl, device, dtype, fresh_heads)
    embedder = M3Embedder(model, tokenizer, max_length, name=str(name_or_path), fast=fast)
    logger.info("loaded %r", embedder)
    return embedder
