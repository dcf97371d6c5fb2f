"""Adapters that let other libraries' code run on a minibge Embedder.

    from minibge.integrations.langchain import MiniBGEEmbeddings   # LangChain's Embeddings interface
    from minibge.integrations.llama_index import MiniBGEEmbedding  # LlamaIndex's BaseEmbedding
    from minibge.integrations import mteb                           # mteb.evaluate(mteb.model(folder), tasks)
    from minibge.integrations.onnx import export_onnx              # the model as one ONNX graph

Each adapter lives in its own module and is imported on demand, so `import minibge` never pulls
in (or requires) the library it adapts to. FlagEmbedding's FlagModel is not here but in
minibge.flag_model: it needs no other library, and `from minibge import FlagModel` is its import line.
"""
