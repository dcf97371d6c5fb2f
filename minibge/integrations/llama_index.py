"""LlamaIndex's `BaseEmbedding` over a minibge Embedder.

    from llama_index.core import Settings, VectorStoreIndex, Document
    from minibge.integrations.llama_index import MiniBGEEmbedding

    Settings.embed_model = MiniBGEEmbedding("weights/bge-small-en-v1.5")   # a folder, a Hub id or embedder=
    index = VectorStoreIndex.from_documents([Document(text="BGE is an embedding model.")])
    index.as_retriever().retrieve("what is BGE?")                           # the query gets the instruction

What LlamaIndex asks of an embedding model, and what minibge answers:

    _get_query_embedding(query)      Embedder.encode_queries: the retrieval instruction + query
    _get_text_embedding(text)        Embedder.encode_corpus: the text as it is, no instruction
    _get_text_embeddings(texts)      one encode_corpus call per LlamaIndex batch (embed_batch_size
                                     texts, 32 by default here; LlamaIndex's own default is 10), which
                                     minibge batches again by length (batch_size)
    the async variants               the same in a worker thread

The instruction is the model's own (Embedder.query_instruction: BGE's by model name, or the folder's
"query" prompt), or query_instruction= ("" for none). Vectors are L2-normalised, so LlamaIndex's
default cosine similarity and a dot product agree.

llama-index-core is an optional extra (`pip install minibge[llama-index]`), imported by this module only.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..embedder import BATCH_SIZE, Embedder, load_embedder

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
except ImportError as error:
    raise ImportError("minibge.integrations.llama_index needs llama-index-core: "
                      f"pip install 'minibge[llama-index]' ({error})") from None


class MiniBGEEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from a minibge model: MiniBGEEmbedding(path_or_hub_id) or MiniBGEEmbedding(embedder=...).

    Extra keywords (device, dtype, pooling, max_length, ...) go to minibge.load_embedder.
    """

    query_instruction: str | None = Field(default=None, description="prepended to queries; None: the model's own")
    batch_size: int = Field(default=BATCH_SIZE, gt=0, description="texts per forward pass inside minibge")
    _embedder: Embedder = PrivateAttr()
    _lock: Any = PrivateAttr()

    def __init__(self, model_name: str | None = None, *, embedder: Embedder | None = None,
                 query_instruction: str | None = None, embed_batch_size: int = 32, batch_size: int = BATCH_SIZE,
                 **load_kwargs):
        if (model_name is None) == (embedder is None):
            raise ValueError("pass a model (a folder or a Hub id) or embedder=, exactly one of the two")
        base_fields = {k: load_kwargs.pop(k) for k in ("callback_manager", "num_workers") if k in load_kwargs}
        if embedder is not None and load_kwargs:
            raise ValueError(f"{sorted(load_kwargs)} are for loading a model; embedder= is already loaded")
        embedder = embedder if embedder is not None else load_embedder(model_name, **load_kwargs)
        super().__init__(model_name=str(model_name or embedder.name), embed_batch_size=embed_batch_size,
                         query_instruction=embedder.query_instruction if query_instruction is None
                         else query_instruction, batch_size=batch_size, **base_fields)
        self._embedder = embedder
        # one Tokenizer must not tokenize in two threads at once (the async methods use threads)
        self._lock = threading.Lock()

    @classmethod
    def class_name(cls) -> str:
        return "MiniBGEEmbedding"

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def _encode(self, texts: list[str], query: bool) -> list[list[float]]:
        options = dict(batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        with self._lock:
            if query:  # "" rather than None when there is none: None would mean the embedder's own
                vectors = self._embedder.encode_queries(texts, instruction=self.query_instruction or "", **options)
            else:
                vectors = self._embedder.encode_corpus(texts, **options)
        return vectors.tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encode([query], query=True)[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._encode([text], query=False)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encode(list(texts), query=False)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
