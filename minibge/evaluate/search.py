"""Exact nearest-neighbour search: the k documents with the highest dot product per query.

With L2-normalised embeddings the dot product is the cosine similarity, so this is what both
`minibge search` and retrieval evaluation (evaluate.py) rank by. The corpus comes as a stream
of chunks, and only a running top-k is kept, so memory is O(queries x chunk), never
O(queries x corpus): a caller can embed each chunk just before it is scored, or read it from
disk (npy_chunks: a saved index, minibge/index.py).

Retrieve, then rerank (`rerank`): a cross-encoder (reranker.py) reads each query with each of its
top candidates and re-orders them; it costs one forward pass per (query, candidate) pair, which is
why it only ever sees the embedder's shortlist.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

# (query, passage) pairs per reranker forward pass. Not the embedder's BATCH_SIZE: a pair is padded to
# the longest in its batch and the reranker has no token budget, so its batches stay small.
RERANK_BATCH_SIZE = 32


def top_k(query_embeddings: torch.Tensor, doc_chunks: Iterable[torch.Tensor], k: int,
          exclude: Sequence[tuple[int, int]] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-first (scores, indices), both (Q, min(k, N)), of the N documents for each of Q queries.

    query_embeddings: (Q, D). doc_chunks: (n_i, D) tensors, consecutive slices of the corpus in
    order (for an (N, D) tensor already in memory, pass ``docs.split(chunk_size)``); indices count
    from the corpus start. exclude: (query row, document index) pairs that must never match; they
    score -inf, so they come last, and only when a query has fewer than k other documents.
    """
    scores = (query_embeddings @ chunk.T for chunk in doc_chunks)  # (Q, n) each
    return top_k_of_scores(scores, k, query_embeddings.shape[0], exclude, query_embeddings.dtype)


def top_k_of_scores(score_chunks: Iterable[torch.Tensor], k: int, n_queries: int,
                    exclude: Sequence[tuple[int, int]] = (), dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k for scores computed elsewhere (a saved index's lexical and hybrid scores, index.py):
    score_chunks are (Q, n_i) tensors, the queries' scores of consecutive slices of the corpus."""
    best_scores = torch.empty(n_queries, 0, dtype=dtype)
    best_index = torch.empty(n_queries, 0, dtype=torch.long)
    excluded_rows, excluded_docs = torch.tensor(list(exclude), dtype=torch.long).reshape(-1, 2).T
    start = 0
    for scores in score_chunks:  # (Q, n)
        n = scores.shape[1]
        inside = (excluded_docs >= start) & (excluded_docs < start + n)
        scores[excluded_rows[inside], excluded_docs[inside] - start] = float("-inf")
        # the chunk's own top k, merged with the best so far: top k of the union is top k overall
        chunk_scores, chunk_index = scores.topk(min(k, n), dim=1)
        merged = torch.cat([best_scores.to(chunk_scores.dtype), chunk_scores], dim=1)
        merged_index = torch.cat([best_index, chunk_index + start], dim=1)
        best_scores, pick = merged.topk(min(k, merged.shape[1]), dim=1)
        best_index = merged_index.gather(1, pick)
        start += n
    return best_scores, best_index


def rerank(reranker, queries: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int = RERANK_BATCH_SIZE,
           max_length: int | None = None) -> list[list[float]]:
    """Cross-encoder scores of each query's candidate passages: candidates[i] are query i's texts;
    returns one list of scores per query, in the candidates' order. All pairs are scored in one
    call, so the reranker's length sort spans every query (less padding than query by query)."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    pairs = [(query, passage) for query, passages in zip(queries, candidates) for passage in passages]
    flat = reranker.score(pairs, batch_size=batch_size, max_length=max_length)
    scores, start = [], 0
    for passages in candidates:
        scores.append(flat[start:start + len(passages)])
        start += len(passages)
    return scores


def npy_header(path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order .npy file, read from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise ValueError(f"{path}: a Fortran-order array; expected rows stored one after another")
        return shape, dtype, f.tell()


def npy_chunks(path, rows: int = 16_384) -> Iterator[torch.Tensor]:
    """The rows of an (N, D) float32 .npy file, `rows` at a time, as (n, D) tensors for top_k.

    I read with plain file reads into one reused buffer rather than through a memory map: the pages
    of a memory map count toward the process's resident memory until the kernel evicts them, so
    scanning a 1.5 GB map shows 1.5 GB of RSS; read pages stay in the page cache, which the kernel
    may drop. Memory is one chunk, whatever N. Each chunk is valid until the next one is asked for.
    """
    shape, dtype, offset = npy_header(path)
    if len(shape) != 2 or dtype != np.dtype("<f4"):
        raise ValueError(f"{path}: expected a little-endian float32 (N, D) array, got {dtype} {shape}")
    n, dim = shape
    buffer = np.empty((min(rows, max(n, 1)), dim), dtype=np.float32)  # (rows, D), reused
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, n, rows):
            chunk = buffer[:min(rows, n - start)]
            view = memoryview(chunk).cast("B")
            if f.readinto(view) != view.nbytes:
                raise ValueError(f"{Path(path).name} ends before its {n} rows (truncated?)")
            yield torch.from_numpy(chunk)
