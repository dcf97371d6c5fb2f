"""mteb's encoder interface over a minibge Embedder: run the MTEB benchmark on minibge.

    import mteb
    from minibge.integrations import mteb as minibge_mteb

    model = minibge_mteb.model("weights/bge-small-en-v1.5")          # a folder, a Hub id or an Embedder
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark", "SciFact"]))

mteb hands an encoder batches of texts plus the task's metadata and a prompt type ("query",
"document" or none); what minibge does with them:

    prompt type "query"     (retrieval and reranking queries): the embedder's retrieval instruction
                            is prepended, as Embedder.encode_queries does (BGE's card: the instruction
                            is for queries of retrieval; mteb's own BGE entry uses it the same way)
    "document" or none      (passages; STS, classification, clustering ... texts): nothing is added
    every text              embedded with Embedder.encode, L2-normalised (as the BGE and MiniLM
                            sentence-transformers pipelines end with Normalize)

A retrieval document reaches the encoder as mteb writes it, title + " " + text, stripped: the text
`minibge eval` embeds too. Scores are cosine similarities (ModelMeta.similarity_fn_name must be
mteb's ScoringFunction enum, not the string "cosine").

The model's metadata (mteb.ModelMeta) is filled from the folder: name = the Hub repository that
minibge.hub.download recorded in minibge_source.json, else "local/<folder name>"; revision from the
same record (None without one); embedding dimension, max tokens (the embedder's max_length),
parameter count, and use_instructions (whether there is a query instruction). Fields minibge cannot
know (license, training data, release date) are None.

mteb is an optional extra (`pip install minibge[mteb]`), imported by this module only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..embedder import BATCH_SIZE, Embedder, load_embedder
from ..hub import SOURCE_FILE, resolve_model_path

try:
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ScoringFunction
    from mteb.types import PromptType
except ImportError as error:  # the message a user sees on `import minibge.integrations.mteb`
    raise ImportError(f"minibge.integrations.mteb needs mteb: pip install 'minibge[mteb]' ({error})") from None

logger = logging.getLogger(__name__)


def _record(folder: Path | None) -> dict:
    """minibge_source.json's {"repo_id", "revision"}, or {} for a folder filled by hand."""
    if folder is None:
        return {}
    try:
        record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def model_meta(embedder: Embedder, folder: Path | None = None) -> ModelMeta:
    """mteb's ModelMeta for an embedder (see the module docstring for where each field comes from)."""
    record = _record(folder)
    short = folder.name if folder is not None else Path(str(embedder.name)).name
    return ModelMeta(
        loader=None, name=record.get("repo_id") or f"local/{short}", revision=record.get("revision"),
        release_date=None, languages=None,
        n_parameters=sum(p.numel() for p in embedder.model.parameters()),
        memory_usage_mb=None, max_tokens=embedder.max_length, embed_dim=embedder.dimension,
        license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch"], similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=bool(embedder.query_instruction), training_datasets=None)


class MiniBGEEncoder(AbsEncoder):
    """An mteb encoder: `.model` is the minibge Embedder, `.mteb_model_meta` its ModelMeta."""

    def __init__(self, embedder: Embedder, folder: Path | None = None, batch_size: int = BATCH_SIZE):
        self.model = self.embedder = embedder
        self.mteb_model_meta = model_meta(embedder, folder)
        self.batch_size = batch_size

    def __repr__(self):
        return f"MiniBGEEncoder({self.embedder!r}, name={self.mteb_model_meta.name!r})"

    def instruction(self, prompt_type) -> str:
        """What is prepended to each text: the retrieval instruction for queries, else nothing."""
        if prompt_type is not None and PromptType(prompt_type) == PromptType.query:
            return self.embedder.query_instruction or ""
        return ""

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """mteb's batches of {"text": [...]} → (N, D) float32, unit length, in input order."""
        texts = []
        for batch in inputs:
            texts += batch["text"]
        prefix = self.instruction(prompt_type)
        logger.info("%s/%s: %d texts, prompt type %s, instruction %r", task_metadata.name, hf_split, len(texts),
                    prompt_type, prefix)
        if not texts:
            return np.empty((0, self.embedder.dimension), dtype=np.float32)
        return self.embedder.encode([prefix + text for text in texts], normalize_embeddings=True,
                                    batch_size=kwargs.get("batch_size", self.batch_size),
                                    show_progress_bar=kwargs.get("show_progress_bar", False))


def model(model_or_path, batch_size: int = BATCH_SIZE, **load_kwargs) -> MiniBGEEncoder:
    """An mteb encoder from a minibge Embedder, a model folder or a Hub id (load_kwargs go to load_embedder)."""
    if isinstance(model_or_path, Embedder):
        if load_kwargs:
            raise ValueError(f"{sorted(load_kwargs)} are for loading a model; this Embedder is already loaded")
        embedder = model_or_path
        folder = getattr(embedder, "folder", None)
        if folder is None:
            try:
                folder = resolve_model_path(embedder.name, download_if_missing=False)
            except Exception:  # an Embedder built by hand: no folder, no record
                folder = None
    else:
        folder = resolve_model_path(model_or_path)
        embedder = load_embedder(folder, **load_kwargs)
    return MiniBGEEncoder(embedder, None if folder is None else Path(folder), batch_size=batch_size)
