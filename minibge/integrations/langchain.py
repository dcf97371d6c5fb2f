"""LangChain's `Embeddings` interface over a minibge Embedder.

    from langchain_core.vectorstores import InMemoryVectorStore
    from minibge.integrations.langchain import MiniBGEEmbeddings

    embeddings = MiniBGEEmbeddings("BAAI/bge-small-en-v1.5")        # or a local folder
    store = InMemoryVectorStore.from_texts(["BGE is an embedding model.", "Paris is in France."], embeddings)
    store.similarity_search("what is BGE?", k=1)                    # embed_query: instruction + query

LangChain asks an embedding model for two things, and BGE treats them differently:

    embed_documents(texts) -> list[list[float]]   passages, never an instruction (encode_corpus)
    embed_query(text)      -> list[float]         one query with the retrieval instruction (encode_queries)

plus the async pair aembed_documents / aembed_query. The instruction is the model's own
(`Embedder.query_instruction`: BGE's English or Chinese one by model name, or the prompt saved in
the folder), overridable with query_instruction= ("" for none). I do not copy the default of
LangChain's HuggingFaceBgeEmbeddings, "Represent this question for searching relevant passages: ":
BGE was trained with "sentence", not "question" (flagembedding.md §1.3).

langchain-core is optional (`pip install minibge[langchain]`). With it, MiniBGEEmbeddings is a
subclass of `langchain_core.embeddings.Embeddings`, so vector stores and chains accept it; without
it this module still imports and the class works on its own, with the same methods.
"""
import asyncio
import threading

from ..embedder import BATCH_SIZE, Embedder, load_embedder
from ..tokenizer import check_texts

try:
    from langchain_core.embeddings import Embeddings as _EmbeddingsBase
except ImportError:  # the adapter works without LangChain; it just is not an instance of its ABC
    _EmbeddingsBase = object


class MiniBGEEmbeddings(_EmbeddingsBase):
    """LangChain embeddings from a minibge model: MiniBGEEmbeddings(path_or_hub_id) or MiniBGEEmbeddings(embedder=...).

    `model_name` and `query_instruction` are spelled as in LangChain's HuggingFaceBgeEmbeddings, and
    as there, setting `.query_instruction` later changes what embed_query adds. Extra keywords
    (device, dtype, pooling, max_length, ...) go to `minibge.load_embedder`.
    """

    def __init__(self, model_name=None, *, embedder: Embedder | None = None,
                 query_instruction: str | None = None, batch_size: int = BATCH_SIZE,
                 normalize_embeddings: bool = True, **load_kwargs):
        if (model_name is None) == (embedder is None):
            raise ValueError("pass a model (a folder or a Hub id) or embedder=, exactly one of the two")
        if embedder is not None and load_kwargs:
            raise ValueError(f"{sorted(load_kwargs)} are for loading a model; embedder= is already loaded")
        self.embedder = embedder if embedder is not None else load_embedder(model_name, **load_kwargs)
        self.query_instruction = self.embedder.query_instruction if query_instruction is None else query_instruction
        self.encode_options = dict(batch_size=batch_size, normalize_embeddings=normalize_embeddings)
        # Async calls run in worker threads, and one Tokenizer must not tokenize in two threads at
        # once (it switches truncation on and off around each batch), so calls take turns.
        self._lock = threading.Lock()

    def __repr__(self):
        return f"MiniBGEEmbeddings({self.embedder!r}, query_instruction={self.query_instruction!r})"

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Passages → one list of floats per text, no instruction."""
        check_texts(texts)  # Embedder.encode's own check; it also refuses one bare str, which encode allows
        with self._lock:
            return self.embedder.encode_corpus(texts, **self.encode_options).tolist()

    def embed_query(self, text: str) -> list[float]:
        """One query → one list of floats, with the retrieval instruction prepended."""
        if not isinstance(text, str):  # a list here would quietly come back as a list of vectors
            raise TypeError(f"embed_query takes one str, got {type(text).__name__}; "
                            "embed_documents takes a list")
        with self._lock:
            # "" rather than None when there is no instruction: None would mean the embedder's own
            instruction = self.query_instruction or ""
            return self.embedder.encode_queries(text, instruction=instruction, **self.encode_options).tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """embed_documents in a worker thread, so the event loop keeps running meanwhile."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """embed_query in a worker thread."""
        return await asyncio.to_thread(self.embed_query, text)
