"""FlagEmbedding's `BGEM3FlagModel`, with minibge underneath: change the import line, keep the code.

BGE-M3's model card, unchanged but for the import:

    model = BGEM3FlagModel("BAAI/bge-m3", use_fp16=True)
    out = model.encode(sentences, batch_size=12, max_length=8192,
                       return_dense=True, return_sparse=True, return_colbert_vecs=True)
    out["dense_vecs"]        # (N, 1024) float32, unit length
    out["lexical_weights"]   # [{"token id": weight}, ...]
    out["colbert_vecs"]      # [(n_i - 1, 1024) float32, ...]
    model.compute_lexical_matching_score(out["lexical_weights"][0], out["lexical_weights"][1])
    model.colbert_score(out["colbert_vecs"][0], out["colbert_vecs"][1])
    model.compute_score(pairs, weights_for_different_modes=[0.4, 0.2, 0.4])
    # {"dense": [...], "sparse": [...], "colbert": [...], "sparse+dense": [...], "colbert+sparse+dense": [...]}
    model.convert_id_to_token(out["lexical_weights"])

It is a set of defaults around one M3Embedder (m3.py, where every formula is written out). The
BGEM3FlagModel followed is FlagEmbedding 1.4's (its M3Embedder):

    use_fp16=True           half-precision weights on a GPU; on a CPU float32 (as FlagEmbedding)
    normalize_embeddings    True: dense and ColBERT vectors unit length (False is not supported)
    pooling_method="cls"    the <s> state ("cls" is the only one BGE-M3 uses)
    batch_size=256          texts per forward pass, longest first
    query_max_length=512,   compute_score's token limits for the two sides of a pair
    passage_max_length=512
    devices                 one device ("cuda:0", "cpu", 0, ["cuda:1"]); None picks CUDA when available
    encode(..., max_length=8192, return_dense=True, return_sparse=False, return_colbert_vecs=False)

FlagEmbedding's other keyword arguments (cache_dir, colbert_dim, ...) are accepted and ignored with
a warning; trust_remote_code=True is refused: minibge runs no code from a checkpoint.
"""
import logging

import numpy as np
import torch

from ..embedder import resolve_dtype
from ..m3 import lexical_matching_score, load_m3
from .flag_model import _single_device

logger = logging.getLogger(__name__)


class BGEM3FlagModel:
    """FlagEmbedding's BGEM3FlagModel API over a minibge M3Embedder (the embedder is `.model`)."""

    def __init__(self, model_name_or_path, normalize_embeddings: bool = True, use_fp16: bool = True,
                 devices=None, pooling_method: str = "cls", batch_size: int = 256, query_max_length: int = 512,
                 passage_max_length: int = 512, return_dense: bool = True, return_sparse: bool = False,
                 return_colbert_vecs: bool = False, **kwargs):
        if kwargs.get("trust_remote_code"):
            raise ValueError("trust_remote_code=True: minibge runs no code from a checkpoint")
        if not normalize_embeddings or pooling_method != "cls":
            raise ValueError("minibge's BGE-M3 uses pooling_method='cls' with normalize_embeddings=True, "
                             "the model's own settings")
        device = kwargs.pop("device", None)  # FlagEmbedding 1.2's name for devices
        if kwargs:
            logger.warning("BGEM3FlagModel: ignoring %s (FlagEmbedding options minibge does not use)", sorted(kwargs))
        device = torch.device(_single_device(devices if devices is not None else device)
                              or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype("float16" if use_fp16 else None, device)
        self.model = load_m3(model_name_or_path, device=device, dtype=dtype)
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.return_dense, self.return_sparse, self.return_colbert_vecs = return_dense, return_sparse, return_colbert_vecs

    def __repr__(self):
        return f"BGEM3FlagModel({self.model!r})"

    def encode(self, sentences, batch_size: int | None = None, max_length: int = 8192,
               return_dense: bool | None = None, return_sparse: bool | None = None,
               return_colbert_vecs: bool | None = None) -> dict:
        """{"dense_vecs", "lexical_weights", "colbert_vecs"}; an output not asked for is None."""
        return self.model.encode(
            sentences, self.batch_size if batch_size is None else batch_size, max_length,
            self.return_dense if return_dense is None else return_dense,
            self.return_sparse if return_sparse is None else return_sparse,
            self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs)

    def convert_id_to_token(self, lexical_weights):
        return self.model.convert_id_to_token(lexical_weights)

    def compute_lexical_matching_score(self, lexical_weights_1, lexical_weights_2):
        """A float for two dicts; a (len 1, len 2) array for two lists of dicts (every pair)."""
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return lexical_matching_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[lexical_matching_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise ValueError("lexical weights must be two dicts or two lists of dicts")

    def colbert_score(self, q_reps, p_reps) -> torch.Tensor:
        """One query's and one passage's ColBERT vectors (n_q, D), (n_p, D) → the late-interaction score
        (a 0-d tensor, as FlagEmbedding returns it): the mean over query vectors of the best passage match."""
        q, p = torch.as_tensor(np.asarray(q_reps)), torch.as_tensor(np.asarray(p_reps))
        return (q @ p.T).max(dim=-1).values.sum() / q.shape[0]  # (n_q, n_p) → (n_q,) → ()

    def compute_score(self, sentence_pairs, batch_size: int | None = None, max_query_length: int | None = None,
                      max_passage_length: int | None = None, weights_for_different_modes=None) -> dict:
        """The five score lists (m3.combine_scores) of (query, passage) pairs; floats for one pair."""
        return self.model.compute_score(
            sentence_pairs, self.batch_size if batch_size is None else batch_size,
            self.query_max_length if max_query_length is None else max_query_length,
            self.passage_max_length if max_passage_length is None else max_passage_length,
            weights_for_different_modes)
