"""minibge.integrations.llama_index.MiniBGEEmbedding: LlamaIndex's BaseEmbedding, the same vectors as
encode_queries (with the instruction) and encode_corpus (without), batched, sync and async."""
import asyncio

import numpy as np
import pytest

import minibge
from conftest import require_module

require_module("llama_index.core")
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402

from minibge.integrations.llama_index import MiniBGEEmbedding  # noqa: E402

QUERIES = ["what is BGE?", "how do vaccines work?"]
PASSAGES = ["BGE is an embedding model.", "Vaccines train the immune system.", "Paris is in France.",
            "A cat sat on the mat.", "Stocks fell today."]


@pytest.fixture(scope="module")
def bge(tmp_path_factory, minilm_dir):
    """A random BGE-named model (so it has BGE's instruction) with the real tokenizer."""
    import torch
    from minibge import BertConfig, BertModel, Embedder, Tokenizer
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    folder = tmp_path_factory.mktemp("models") / "bge-small-en-v1.5"
    Embedder(BertModel(config).eval(), Tokenizer.from_pretrained(minilm_dir)).save_pretrained(folder)
    (folder / "config_sentence_transformers.json").unlink()  # instruction from the name, as BGE's own folder
    return minibge.load_embedder(folder)


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-6, f"max |diff| {np.abs(a - b).max()}"


def test_queries_get_the_instruction_documents_do_not(bge):
    model = MiniBGEEmbedding(embedder=bge, embed_batch_size=2)
    assert isinstance(model, BaseEmbedding) and model.query_instruction == minibge.embedder.INSTRUCTION_EN
    close(model.get_query_embedding(QUERIES[0]), bge.encode_queries(QUERIES[:1])[0])
    close(model.get_text_embedding(PASSAGES[0]), bge.encode_corpus(PASSAGES[:1])[0])
    close(model.get_text_embedding_batch(PASSAGES), bge.encode_corpus(PASSAGES))  # 3 batches of <= 2
    assert not np.allclose(model.get_query_embedding(QUERIES[0]), bge.encode_corpus(QUERIES[:1])[0], atol=1e-4)
    close(asyncio.run(model.aget_query_embedding(QUERIES[1])), bge.encode_queries(QUERIES[1:])[0])
    close(asyncio.run(model.aget_text_embedding_batch(PASSAGES)), bge.encode_corpus(PASSAGES))
    plain = MiniBGEEmbedding(embedder=bge, query_instruction="")
    close(plain.get_query_embedding(QUERIES[0]), bge.encode_corpus(QUERIES[:1])[0])


def test_loads_a_folder_and_refuses_ambiguity(minilm_dir, bge):
    model = MiniBGEEmbedding(str(minilm_dir), device="cpu")
    assert model.embedder.pooling == "mean" and model.model_name == str(minilm_dir)
    close(model.get_text_embedding_batch(PASSAGES[:2]), model.embedder.encode_corpus(PASSAGES[:2]))
    with pytest.raises(ValueError, match="exactly one"):
        MiniBGEEmbedding()
    with pytest.raises(ValueError, match="already loaded"):
        MiniBGEEmbedding(embedder=bge, device="cpu")


def test_works_in_a_vector_store_index(bge):
    from llama_index.core import Document, VectorStoreIndex
    model = MiniBGEEmbedding(embedder=bge)
    index = VectorStoreIndex.from_documents([Document(text=p) for p in PASSAGES], embed_model=model)
    nodes = index.as_retriever(similarity_top_k=5).retrieve(QUERIES[0])
    q = bge.encode_queries(QUERIES[:1])[0]
    expected = sorted(PASSAGES, key=lambda p: -float(q @ bge.encode_corpus([p])[0]))
    assert [n.node.get_content() for n in nodes] == expected
