"""Export an embedder to ONNX: token ids in, unit-length sentence embeddings out.

    from minibge.integrations.onnx import export_onnx
    export_onnx(minibge.load_embedder("weights/all-MiniLM-L6-v2"), "minilm.onnx")   # checked, then renamed into place

or `minibge export -m MODEL --onnx FILE`. The graph is the whole of encode() after tokenizing:

    inputs   input_ids       (batch, sequence) int64   from the model's tokenizer, right-padded
             attention_mask  (batch, sequence) int64   1 = real token, 0 = padding
    output   sentence_embedding  (batch, D) float32    encoder → pooling (the embedder's: CLS or
                                                       mean over real tokens) → L2 normalisation

Both axes are dynamic. Tokenizing stays outside (ONNX has no WordPiece), e.g. with `tokenizers` and
the folder's tokenizer.json: truncate to the embedder's max_length, pad on the right. token_type_ids
are all zero for one text, so they are built inside the graph.

Exact choices:
- I trace a small wrapper rather than BertModel.forward: the model checks its inputs with
  data-dependent Python (`.item()`, "is anything padded?"), which a trace would freeze into the graph
  for the example batch. The wrapper always passes the padding mask, so one graph serves padded and
  unpadded batches alike.
- The TorchScript exporter (dynamo=False), opset 17: it needs no extra package beyond `onnx`. torch ≥ 2.9
  marks it deprecated (the torch.export-based exporter is the default there and needs onnxscript); I
  silence that one DeprecationWarning, and the ONNX Runtime check below is what vouches for the file.
- After export the file is run in ONNX Runtime on real texts of different lengths, in one padded
  batch, and compared with Embedder.encode; below cosine 0.99999 for any text it is deleted and the
  export fails. The file is written under a temporary name beside the target and renamed at the end.
- Needs `onnx` and `onnxruntime` (the `bench` extra has both); imported only here.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..common import atomic_path
from ..model import POOLING, l2_normalize

logger = logging.getLogger(__name__)

OPSET = 17
MIN_COSINE = 0.99999
CHECK_TEXTS = [  # lengths from 3 to ~80 tokens, so the check batch is padded
    "Hello world.",
    "A man is eating food.",
    "Represent this sentence for searching relevant passages: how do vaccines work?",
    "The quick brown fox jumps over the lazy dog, while the cat watches from the warm windowsill.",
    "BGE (BAAI General Embedding) maps any text to a dense vector, which can be used for retrieval, "
    "classification, clustering or semantic search; it can also be used in vector databases for LLMs.",
    "Paris est la capitale de la France.",
    "数据是新的石油。",
]


class SentenceEmbedding(nn.Module):
    """input_ids, attention_mask (B, T) → unit-length (B, D): the encoder, the pooling and the normalisation."""

    def __init__(self, model, pooling: str):
        super().__init__()
        self.model, self.pool = model, POOLING[pooling]

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T), True = attend
        x = self.model.embeddings(input_ids)  # (B, T, H); token types all 0, positions 0..T-1
        for layer in self.model.layers:
            x, _ = layer(x, mask)
        return l2_normalize(self.pool(x, attention_mask))  # (B, D)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install onnx onnxruntime") from None
    return onnxruntime


def run_onnx(path, embedder, texts: list[str]) -> np.ndarray:
    """(N, D) from the ONNX file at `path` in ONNX Runtime, with `embedder`'s tokenizer and max_length."""
    session = _onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = embedder.tokenize(texts)  # right-padded (B, T), cut at the embedder's max_length
    feeds = {name: batch[name].cpu().numpy().astype(np.int64) for name in ("input_ids", "attention_mask")}
    return session.run(["sentence_embedding"], feeds)[0]


def check_onnx(path, embedder, texts: list[str] = CHECK_TEXTS) -> float:
    """The smallest cosine between ONNX Runtime's and Embedder.encode's vectors for `texts`; ValueError below 0.99999."""
    ours = run_onnx(path, embedder, texts)
    reference = embedder.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    cosine = float((ours * reference).sum(axis=1).min())
    if not cosine >= MIN_COSINE:
        raise ValueError(f"the ONNX export of {embedder.name} disagrees with encode(): min cosine {cosine:.7f} "
                         f"< {MIN_COSINE} on {len(texts)} texts")
    return cosine


def export_onnx(embedder, path, check_texts: list[str] = CHECK_TEXTS) -> Path:
    """Write `embedder` as ONNX to `path` (see the module docstring); returns the path."""
    try:
        importlib.import_module("onnx")  # torch.onnx.export needs it
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    _onnxruntime()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name like {path / 'model.onnx'}")
    wrapper = SentenceEmbedding(embedder.model, embedder.pooling).eval()
    model_dtype = next(embedder.model.parameters()).dtype
    if model_dtype != torch.float32 or embedder.device.type != "cpu":
        raise ValueError(f"export from a float32 model on the CPU (load_embedder(..., device='cpu')); "
                         f"this one is {model_dtype} on {embedder.device}")
    example = embedder.tokenize(["a short text", "a somewhat longer text, so that the batch is padded"])
    with atomic_path(path) as partial:  # renamed into place only once the check below has passed
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapper, (example["input_ids"], example["attention_mask"]), str(partial), dynamo=False,
                input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                              "sentence_embedding": {0: "batch"}},
                opset_version=OPSET)
        cosine = check_onnx(partial, embedder, check_texts)
    logger.info("exported %s to %s (min cosine with encode: %.7f)", embedder.name, path, cosine)
    return path
