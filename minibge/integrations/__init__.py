"""Adapters that let other libraries' code run on a minibge Embedder.

    from minibge.integrations.langchain import MiniBGEEmbeddings   # LangChain's Embeddings interface
    from minibge.integrations.llama_index import MiniBGEEmbedding  # LlamaIndex's BaseEmbedding
    from minibge.integrations import mteb                           # mteb.evaluate(mteb.model(folder), tasks)
    from minibge.integrations.onnx import export_onnx              # the model as one ONNX graph

Each adapter lives in its own module and is imported on demand, so `import minibge` never pulls
in (or requires) the library it adapts to. FlagEmbedding's FlagModel (flag_model.py) needs no other
library, so minibge/__init__.py imports it: `from minibge import FlagModel` is its import line.
"""
