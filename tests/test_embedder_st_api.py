"""Embedder's sentence-transformers surface (ST ≥ 5 names and meanings), against sentence-transformers
itself on the real all-MiniLM-L6-v2 and on a folder minibge saved."""
import logging

import numpy as np
import pytest
import torch
from conftest import require_module

import minibge
from minibge.quantization import quantize_embeddings

TEXTS = ["A man is playing a guitar.", "Giant pandas eat bamboo.", "The stock market fell sharply today.",
         "x", "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 20]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return minibge.load_embedder(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    require_module("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(minilm_dir), device="cpu")


def assert_close(got, ref, what, atol=1e-5):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs {ref.shape}"
    diff = np.abs(got - ref)
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}"


def test_truncate_dim_matches_sentence_transformers(minilm, st_model, minilm_dir):
    from sentence_transformers import SentenceTransformer
    st_128 = SentenceTransformer(str(minilm_dir), device="cpu", truncate_dim=128)
    for normalize in (True, False):
        got = minilm.encode(TEXTS, truncate_dim=128, normalize_embeddings=normalize)
        ref = st_128.encode(TEXTS, normalize_embeddings=normalize)
        assert got.shape == (len(TEXTS), 128)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.99999, f"normalize={normalize}: min cosine {cos.min():.8f}"
        if normalize:  # unnormalised, the lengths differ: this folder's Normalize module runs inside ST
            assert_close(got, ref, f"truncate_dim=128, normalize={normalize}")
    norms = np.linalg.norm(minilm.encode(TEXTS, truncate_dim=128), axis=1)
    assert np.allclose(norms, 1, atol=1e-5), "normalised after the cut, not before"


@pytest.mark.parametrize("fast", [True, False])
def test_token_embeddings_match_sentence_transformers(minilm, st_model, fast, monkeypatch):
    monkeypatch.setattr(minilm, "fast", fast)
    got = minilm.encode(TEXTS, output_value="token_embeddings")
    ref = st_model.encode(TEXTS, output_value="token_embeddings")
    assert len(got) == len(TEXTS)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        assert_close(g, r.cpu().numpy(), f"text {i} (fast={fast})")
    one = minilm.encode(TEXTS[0], output_value="token_embeddings", convert_to_tensor=True)
    assert isinstance(one, torch.Tensor) and one.shape == got[0].shape


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_precision_equals_quantize_embeddings(minilm, precision):
    floats = minilm.encode(TEXTS)
    got = minilm.encode(TEXTS, precision=precision)
    ref = quantize_embeddings(floats, precision)
    assert got.dtype == ref.dtype and np.array_equal(got, ref), f"{precision}: differs from quantize_embeddings"
    calibration = minilm.encode([t[::-1] for t in TEXTS] + TEXTS)
    got = minilm.encode(TEXTS, precision=precision, calibration_embeddings=calibration)
    assert np.array_equal(got, quantize_embeddings(floats, precision, calibration_embeddings=calibration))
    if precision in ("int8", "uint8"):
        from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
        assert np.array_equal(got, st_quantize(floats, precision=precision, calibration_embeddings=calibration))


def test_bad_precision_and_devices(minilm):
    with pytest.raises(ValueError, match="precision"):
        minilm.encode(TEXTS, precision="float16")
    with pytest.raises(ValueError, match="one device"):
        minilm.encode(TEXTS, device=["cpu", "cpu"])
    with pytest.raises(ValueError, match="output_value"):
        minilm.encode(TEXTS, output_value="cls")
    with pytest.raises(ValueError, match="prompt_name"):
        minilm.encode(TEXTS, prompt_name="nonexistent")


def test_queries_documents_prompts_and_similarity_agree_with_sentence_transformers(minilm, tmp_path):
    require_module("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    embedder = minibge.load_embedder(minilm.name, device="cpu", query_instruction="query: ")
    embedder.prompts["classify"] = "topic: "
    folder = embedder.save_pretrained(tmp_path / "saved")
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.prompts["query"] == "query: " and st.prompts["classify"] == "topic: "
    reloaded = minibge.load_embedder(folder, device="cpu")
    assert reloaded.prompts["classify"] == "topic: " and reloaded.query_instruction == "query: "
    q, d = reloaded.encode_query(TEXTS[:2]), reloaded.encode_document(TEXTS)
    assert_close(q, st.encode_query(TEXTS[:2], normalize_embeddings=True), "encode_query")
    assert_close(d, st.encode_document(TEXTS, normalize_embeddings=True), "encode_document")
    assert_close(q, reloaded.encode_queries(TEXTS[:2]), "encode_query == FlagEmbedding's encode_queries")
    assert_close(reloaded.encode(TEXTS, prompt_name="classify"), st.encode(TEXTS, prompt_name="classify"), "prompt_name")
    assert_close(reloaded.encode(TEXTS, prompt="x: "), st.encode(TEXTS, prompt="x: "), "prompt")
    for fn in ("cosine", "dot", "euclidean", "manhattan"):
        reloaded.similarity_fn_name = st.similarity_fn_name = fn
        assert_close(reloaded.similarity(q, d), st.similarity(q, d), f"similarity {fn}")
        assert_close(reloaded.similarity_pairwise(d, d[::-1].copy()), st.similarity_pairwise(d, d[::-1].copy()),
                     f"similarity_pairwise {fn}")
    assert reloaded.get_sentence_embedding_dimension() == reloaded.get_embedding_dimension() == st.get_embedding_dimension() == 384
    assert reloaded.max_seq_length == st.max_seq_length == 256
    reloaded.similarity_fn_name = "dot"
    reloaded.default_prompt_name = "classify"
    again = minibge.load_embedder(reloaded.save_pretrained(tmp_path / "again"), device="cpu")
    assert again.similarity_fn_name == "dot" and again.default_prompt_name == "classify"
    assert_close(again.encode(TEXTS), st.encode(TEXTS, prompt_name="classify"), "default_prompt_name")


def test_inputs_sentence_transformers_accepts(minilm):
    pd = require_module("pandas")
    ref = minilm.encode(TEXTS)
    assert_close(minilm.encode(np.array(TEXTS)), ref, "numpy str array")
    assert_close(minilm.encode(np.array(TEXTS, dtype=object)), ref, "numpy object array")
    assert_close(minilm.encode(pd.Series(TEXTS)), ref, "pandas Series")
    assert_close(minilm.encode(tuple(TEXTS), batch_size=np.int64(2), max_length=np.int32(256)), ref, "numpy ints")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        minilm.encode(np.array(["a", 3], dtype=object))


def test_bad_window_and_budget_are_one_line_errors(minilm, monkeypatch):
    for name in ("sort_window", "max_tokens"):
        monkeypatch.setattr(minilm, name, 0)
        with pytest.raises(ValueError, match=name):
            minilm.encode(TEXTS)
        monkeypatch.undo()


def test_encode_in_train_mode_warns_once(minilm_dir, caplog):
    embedder = minibge.load_embedder(minilm_dir, device="cpu")
    embedder.model.train()
    with caplog.at_level(logging.WARNING, logger="minibge.embedder"):
        embedder.encode(TEXTS[:2])
        embedder.encode(TEXTS[:2])
    warnings = [r for r in caplog.records if "train mode" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    assert embedder.model.training, "encode() must leave the caller's mode alone"
