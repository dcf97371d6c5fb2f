"""Adapters that let other libraries' code run on a minibge Embedder.

    from minibge.integrations.langchain import MiniBGEEmbeddings   # LangChain's Embeddings interface

Each adapter lives in its own module and is imported on demand, so `import minibge` never pulls
in (or requires) the library it adapts to. FlagEmbedding's FlagModel is not here but in
minibge.flag_model: it needs no other library, and `from minibge import FlagModel` is its import line.
"""
