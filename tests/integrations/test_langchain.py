"""minibge.integrations.langchain: LangChain's Embeddings interface, checked on the vectors."""
import asyncio
import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, require_module
from test_flag_model import BAD_INPUTS, assert_close, assert_differ, error_of

import minibge
from minibge.embedder import INSTRUCTION_EN
from minibge.integrations.langchain import MiniBGEEmbeddings

QUERIES = ["what is a panda?", "how tall is mount everest"]
PASSAGES = ["The giant panda is a bear native to south central China.",
            "Mount Everest is Earth's highest mountain above sea level, at 8,849 metres.",
            "The Eiffel Tower is a wrought-iron lattice tower in Paris."]


@pytest.fixture
def bge_embeddings(fake_bge):
    return MiniBGEEmbeddings(fake_bge("bge-small-en-v1.5"))


def test_is_a_langchain_embeddings():
    embeddings_module = require_module("langchain_core.embeddings")
    assert issubclass(MiniBGEEmbeddings, embeddings_module.Embeddings)


def test_vector_store_finds_the_right_passage(minilm_dir):
    vectorstores = require_module("langchain_core.vectorstores")
    store = vectorstores.InMemoryVectorStore.from_texts(PASSAGES, MiniBGEEmbeddings(minilm_dir))
    for query, expected in [("Which animal lives in China's bamboo forests?", PASSAGES[0]),
                            ("What is the tallest mountain in the world?", PASSAGES[1]),
                            ("famous landmarks in France", PASSAGES[2])]:
        found = store.similarity_search(query, k=1)
        assert [doc.page_content for doc in found] == [expected], f"{query!r} found {found}"


def test_queries_carry_the_instruction_documents_never(bge_embeddings):
    embedder = bge_embeddings.embedder
    assert bge_embeddings.query_instruction == INSTRUCTION_EN  # the model's own, not LangChain's "question"
    queries = [bge_embeddings.embed_query(q) for q in QUERIES]
    assert_close(queries, embedder.encode([INSTRUCTION_EN + q for q in QUERIES]), "embed_query")
    assert_differ(queries, embedder.encode(QUERIES), "embed_query vs bare queries")
    assert_close(bge_embeddings.embed_documents(QUERIES), embedder.encode(QUERIES), "embed_documents")


def test_instruction_is_overridable(fake_bge):
    embedder = minibge.load_embedder(fake_bge("bge-small-en-v1.5"))
    custom = MiniBGEEmbeddings(embedder=embedder, query_instruction="query: ")
    assert_close(custom.embed_query(QUERIES[0]), embedder.encode("query: " + QUERIES[0]), "query_instruction=")
    custom.query_instruction = ""  # set later, as LangChain's HuggingFaceBgeEmbeddings allows: no instruction
    assert_close(custom.embed_query(QUERIES[0]), embedder.encode(QUERIES[0]), "query_instruction=''")
    assert embedder.query_instruction == INSTRUCTION_EN, "the adapter must not change the embedder"
    no_default = MiniBGEEmbeddings(fake_bge("my-model"))  # a name that is not BGE's: no instruction
    assert no_default.query_instruction is None
    assert_close(no_default.embed_query(QUERIES[0]), no_default.embedder.encode(QUERIES[0]), "no instruction")


def test_returns_plain_python_floats(bge_embeddings):
    dim = bge_embeddings.embedder.dimension
    documents = bge_embeddings.embed_documents(PASSAGES)
    query = bge_embeddings.embed_query(QUERIES[0])
    assert type(documents) is list and len(documents) == len(PASSAGES)
    assert all(type(row) is list and len(row) == dim for row in documents)
    assert type(query) is list and len(query) == dim and all(type(x) is float for x in query)
    assert abs(np.linalg.norm(query) - 1) < 1e-5
    assert bge_embeddings.embed_documents([]) == []


def test_async_pair_matches_the_sync_pair(bge_embeddings):
    async def run_together():
        # concurrent calls share one tokenizer: the adapter must make them take turns
        return await asyncio.gather(bge_embeddings.aembed_documents(PASSAGES),
                                    *(bge_embeddings.aembed_query(q) for q in QUERIES))
    documents, *queries = asyncio.run(run_together())
    assert_close(documents, bge_embeddings.embed_documents(PASSAGES), "aembed_documents")
    assert_close(queries, [bge_embeddings.embed_query(q) for q in QUERIES], "aembed_query")


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=repr)
def test_bad_documents_get_the_embedders_error(bge_embeddings, bad):
    assert error_of(bge_embeddings.embed_documents, bad) == error_of(bge_embeddings.embedder.encode, bad)


def test_bad_queries_are_refused(bge_embeddings):
    with pytest.raises(TypeError, match="embed_query takes one str, got list"):
        bge_embeddings.embed_query(QUERIES)
    with pytest.raises(TypeError, match="texts must be a list of str, got str"):
        bge_embeddings.embed_documents("one bare string")  # encode would give one vector, not a list of them
    with pytest.raises(ValueError, match="exactly one"):
        MiniBGEEmbeddings()


def test_works_without_langchain(bge_embeddings, monkeypatch):
    """A second copy of the module, imported as if langchain-core were not installed."""
    for name in ("langchain_core", "langchain_core.embeddings"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` raise ImportError
    path = REPO_ROOT / "minibge" / "integrations" / "langchain.py"
    spec = importlib.util.spec_from_file_location("minibge.integrations._langchain_absent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.MiniBGEEmbeddings.__bases__ == (object,)
    plain = module.MiniBGEEmbeddings(embedder=bge_embeddings.embedder)
    assert_close(plain.embed_query(QUERIES[0]), bge_embeddings.embed_query(QUERIES[0]), "embed_query")
    assert_close(asyncio.run(plain.aembed_documents(PASSAGES)), bge_embeddings.embed_documents(PASSAGES),
                 "aembed_documents")
