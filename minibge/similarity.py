"""Similarity scores between embeddings: cosine, dot, euclidean, manhattan.

    similarity(a, b, "cosine")            # (N, M): score of a[i] against b[j]
    similarity_pairwise(a, b, "cosine")   # (N,):   score of a[i] against b[i]

The names, values and sign conventions are sentence-transformers' SimilarityFunction, so
`similarity_fn_name` in config_sentence_transformers.json means the same thing in both libraries:

    cosine      a·b / (|a| |b|)       each row L2-normalised first (a zero row stays zero: score 0)
    dot         a·b                   equals cosine for unit vectors
    euclidean   -|a - b|_2            NEGATIVE distances, so that for every function a higher score
    manhattan   -|a - b|_1            means more similar and the same argmax / top-k code applies

Inputs: (N, D) or (D,) numpy arrays, torch tensors or lists of vectors; a 1-D input counts as one
row in `similarity`. Half-precision inputs are scored in float32 (a matmul in float16 rounds its
outputs to float16, turning nearby scores into ties). The result is a float torch tensor on the
inputs' device.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")


def similarity_fn_name(name) -> str:
    """The name of a similarity function, checked; ValueError for an unknown one."""
    name = getattr(name, "value", name)  # sentence-transformers' SimilarityFunction enum works too
    if name not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"similarity function must be one of {', '.join(SIMILARITY_FUNCTIONS)}, got {name!r}")
    return name


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        t = torch.stack(list(x))
    else:
        t = torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        t = t.float()
    elif torch.finfo(t.dtype).bits < 32:
        t = t.float()
    return t


def similarity(a, b, fn: str = "cosine") -> torch.Tensor:
    """(N, M) scores of every row of `a` against every row of `b`."""
    fn = similarity_fn_name(fn)
    a, b = _as_tensor(a), _as_tensor(b)
    a, b = (a.unsqueeze(0) if a.dim() == 1 else a), (b.unsqueeze(0) if b.dim() == 1 else b)  # (N, D), (M, D)
    if fn == "cosine":
        return F.normalize(a, p=2, dim=-1) @ F.normalize(b, p=2, dim=-1).T
    if fn == "dot":
        return a @ b.T
    return -torch.cdist(a, b, p=2.0 if fn == "euclidean" else 1.0)


def similarity_pairwise(a, b, fn: str = "cosine") -> torch.Tensor:
    """(N,) scores of a[i] against b[i]; `a` and `b` have the same shape."""
    fn = similarity_fn_name(fn)
    a, b = _as_tensor(a), _as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"pairwise similarity needs inputs of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if fn == "cosine":
        a, b = F.normalize(a, p=2, dim=-1), F.normalize(b, p=2, dim=-1)
        fn = "dot"
    if fn == "dot":
        return (a * b).sum(dim=-1)
    if fn == "euclidean":
        return -torch.linalg.vector_norm(a - b, dim=-1)
    return -(a - b).abs().sum(dim=-1)
