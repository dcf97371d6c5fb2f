"""BGE-M3's retrieval modes over a BEIR corpus: every query scored against every document by the dense,
lexical and ColBERT scores and their two combinations (m3.py), then MTEB's metrics per mode
(tasks.retrieval_metrics), as docs/m3.md's SciFact table needs them.

Exact search, no index: the (queries × documents) score matrix of each mode is computed whole.

    dense     Q (Nq, H) @ D (Nd, H)ᵀ
    sparse    the lexical weights as sparse (N, V) matrices, Q_lex @ D_lexᵀ: Σ over shared token ids
    colbert   per query, its vectors against every document vector at once (nq, Σ n_d), then the
              max within each document (scatter_reduce "amax" by the vector's document), mean over
              the query's vectors
    sparse+dense, colbert+sparse+dense: m3.combine_scores' weighted means

Memory: every document's ColBERT vectors are held at once, float32: Σ n_d × D × 4 bytes (SciFact's
5,183 abstracts at ~300 tokens and D = 384 are ~2.3 GB).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from ..m3 import combine_scores
from .data import document_text
from .tasks import retrieval_metrics


def lexical_matrix(weights: list[dict], vocab_size: int) -> torch.Tensor:
    """[{"token id": w}] → a sparse (N, V) float32 COO matrix, row i holding text i's weights."""
    rows = [i for i, item in enumerate(weights) for _ in item]
    cols = [int(t) for item in weights for t in item]
    values = [w for item in weights for w in item.values()]
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(index, torch.tensor(values, dtype=torch.float32), (len(weights), vocab_size),
                                   check_invariants=True)  # ids in [0, V), as a sparse tensor requires


def colbert_matrix(queries: list, documents: list) -> torch.Tensor:
    """s_mul of every query against every document: lists of (n, D) arrays → (Nq, Nd)."""
    every = torch.as_tensor(np.concatenate(documents))                                   # (Σ n_d, D)
    owner = torch.repeat_interleave(torch.arange(len(documents)),
                                    torch.tensor([len(d) for d in documents]))           # (Σ n_d,) its document
    scores = torch.empty(len(queries), len(documents))
    for i, q in enumerate(queries):
        sim = torch.as_tensor(q) @ every.T                                               # (nq, Σ n_d)
        best = torch.full((sim.shape[0], len(documents)), float("-inf"))
        best = best.scatter_reduce(1, owner.expand_as(sim), sim, reduce="amax")         # (nq, Nd) best per document
        scores[i] = best.mean(dim=0)                                                     # mean over query vectors
    return scores


def score_matrices(m3, queries: Sequence[str], documents: Sequence[str], batch_size: int = 32,
                   max_query_length: int = 512, max_passage_length: int = 512, weights=None) -> dict:
    """{mode: (Nq, Nd) float64 array} for the five modes of m3.SCORE_MODES."""
    every = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q = m3.encode(list(queries), batch_size, max_query_length, **every)
    d = m3.encode(list(documents), batch_size, max_passage_length, **every)
    vocab = m3.model.config.vocab_size
    dense = q["dense_vecs"] @ d["dense_vecs"].T
    with warnings.catch_warnings():  # torch calls its sparse kernels "beta"; the product is a plain sum
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        sparse = torch.sparse.mm(lexical_matrix(q["lexical_weights"], vocab),
                                 lexical_matrix(d["lexical_weights"], vocab).t()).to_dense().numpy()
    colbert = colbert_matrix(q["colbert_vecs"], d["colbert_vecs"]).numpy()
    return {mode: np.asarray(s) for mode, s in combine_scores(dense, sparse, colbert, weights).items()}


def m3_retrieval(m3, corpus: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
                 qrels: Mapping[str, Mapping[str, int]], k_values: Sequence[int] = (1, 3, 5, 10, 100),
                 batch_size: int = 32, max_query_length: int = 512, max_passage_length: int = 512,
                 weights=None) -> dict:
    """{mode: retrieval_metrics} for each of the five modes; only queries with a relevant document are scored."""
    scored = [q for q in queries if any(r > 0 for r in qrels.get(q, {}).values())]
    if not scored or not corpus:
        raise ValueError("m3_retrieval needs a corpus and a query with a relevant document in the qrels")
    doc_ids = list(corpus)
    matrices = score_matrices(m3, [queries[q] for q in scored], [document_text(corpus[d]) for d in doc_ids],
                              batch_size, max_query_length, max_passage_length, weights)
    return mode_metrics(matrices, scored, doc_ids, qrels, k_values)


def mode_metrics(matrices: Mapping[str, np.ndarray], query_ids: Sequence[str], doc_ids: Sequence[str],
                 qrels: Mapping[str, Mapping[str, int]], k_values: Sequence[int] = (1, 3, 5, 10, 100)) -> dict:
    """{mode: retrieval_metrics} from {mode: (Nq, Nd) scores}, row i = query_ids[i], column j = doc_ids[j]."""
    k = min(max(k_values), len(doc_ids))
    out = {}
    for mode, matrix in matrices.items():
        top = np.argsort(-matrix, axis=1, kind="stable")[:, :k]                          # (Nq, k)
        results = {qid: {doc_ids[j]: float(matrix[i, j]) for j in top[i]} for i, qid in enumerate(query_ids)}
        out[mode] = retrieval_metrics(qrels, results, k_values)
    return out
