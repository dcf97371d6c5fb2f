"""The text API: encode / encode_queries / encode_corpus, against sentence-transformers and by contract."""
import numpy as np
import pytest
import torch
from conftest import WEIGHTS_DIR
from hypothesis import given, settings
from hypothesis import strategies as st

import minibge
from minibge.embedder import BATCH_SIZE, INSTRUCTION_EN, INSTRUCTION_ZH, length_sorted_batches, read_pooling_mode
from minibge.evaluate.data import load_sts_csv
from minibge.hub import HubError



@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return minibge.load_embedder(minilm_dir)


@pytest.mark.slow
def test_matches_sentence_transformers_on_stsb(minilm, minilm_dir, shared_data):
    from sentence_transformers import SentenceTransformer
    s1, s2, _ = load_sts_csv(shared_data / "stsbenchmark" / "sts-test.csv")
    sentences = s1 + s2
    assert len(sentences) == 2758
    ours = minilm.encode(sentences, batch_size=64)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, batch_size=64,
                                                                           normalize_embeddings=True)
    cosines = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(ours, axis=1)
    worst = int(cosines.argmin())
    assert cosines.min() >= 0.99999, f"min cosine {cosines.min():.8f} for {sentences[worst]!r}; " \
        f"max |diff| {np.abs(ours - reference).max():.3e}"


def test_shapes_and_types(minilm):
    assert minilm.pooling == "mean" and minilm.max_length == 256 and minilm.query_instruction is None
    one = minilm.encode("hello world")
    assert one.shape == (384,) and one.dtype == np.float32
    assert np.isclose(np.linalg.norm(one), 1.0, atol=1e-6)
    assert minilm.encode([]).shape == (0, 384)
    assert minilm.encode(["a", "b"]).shape == (2, 384)
    tensor = minilm.encode(["a", "b"], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 384)
    as_list = minilm.encode(["a", "b"], convert_to_numpy=False)
    assert isinstance(as_list, list) and as_list[0].shape == (384,)
    raw = minilm.encode(["a longer sentence here"], normalize_embeddings=False)
    assert not np.isclose(np.linalg.norm(raw), 1.0)


def test_order_restored_and_batch_size_irrelevant(minilm):
    texts = ["short", "a much longer sentence that will sort first", "mid length text", "x", "another one here"]
    together = minilm.encode(texts, batch_size=2)
    for i, text in enumerate(texts):
        alone = minilm.encode(text)
        assert np.allclose(together[i], alone, atol=1e-5), f"{text!r}: max |diff| {np.abs(together[i] - alone).max():.2e}"


def test_long_text_is_truncated_not_an_error(minilm):
    long_text = "word " * 5000
    exact = minilm.encode(long_text)
    cut = minilm.tokenizer.encode_batch([long_text], minilm.max_length)[0]
    assert len(cut) == minilm.max_length
    shorter = minilm.encode(long_text, max_length=16)
    assert not np.allclose(exact, shorter)


@pytest.mark.parametrize("bad, index, kind", [([None], 0, "NoneType"), (["ok", 3], 1, "int"),
                                              (["ok", "fine", b"bytes"], 2, "bytes")])
def test_bad_items_name_the_index(minilm, bad, index, kind):
    with pytest.raises(TypeError, match=rf"texts\[{index}\] is {kind}"):
        minilm.encode(bad)
    with pytest.raises(TypeError, match=rf"texts\[{index}\]"):
        minilm.encode_queries(bad)


def test_bad_arguments(minilm):
    with pytest.raises(TypeError, match="list of str"):
        minilm.encode(42)
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["a"], batch_size=0)


def test_default_batches_hold_256_texts_within_the_token_budget(minilm, monkeypatch):
    texts = ["one two three four"] * 600  # 6 tokens each with [CLS] and [SEP]
    sizes = [len(indices) for indices, _ in minilm.iter_batches(texts)]
    assert BATCH_SIZE == 256 and sizes == [256, 256, 88], sizes  # FlagEmbedding's 256; 256 × 6 tokens fit 4,096
    monkeypatch.setattr(minilm, "max_tokens", 600)               # the token budget binds first: 100 texts a batch
    sizes = [len(indices) for indices, _ in minilm.iter_batches(texts)]
    assert sizes == [100] * 6, sizes
    # batching changes which rows share a matmul, not what each row computes
    texts = ["text number %d, a little longer %s" % (i, "than that " * (i % 7)) for i in range(300)]
    default, small = minilm.encode(texts), minilm.encode(texts, batch_size=32)
    assert np.abs(default - small).max() < 1e-5, f"max |diff| {np.abs(default - small).max():.2e}"


@pytest.mark.parametrize("fast", [True, False])
def test_streams_batch_by_batch(minilm, monkeypatch, fast):
    seen = []
    original = minilm.tokenizer.encode_batch
    monkeypatch.setattr(minilm.tokenizer, "encode_batch", lambda texts, n: seen.append(len(texts)) or original(texts, n))
    monkeypatch.setattr(minilm, "fast", fast)
    batches = minilm.iter_batches(["text number %d" % i for i in range(10_000)], batch_size=16)
    next(batches)
    # the generator tokenizes only what it is about to run: one window (sorted by token length
    # together), on either path, never the whole input
    assert minilm.sort_window < 10_000 and seen == [minilm.sort_window]


def test_progress_bar_on_request(minilm, capsys):
    minilm.encode(["a", "b", "c"], batch_size=1, show_progress_bar=True)
    assert "Batches" in capsys.readouterr().err
    minilm.encode(["a", "b", "c"], batch_size=1)  # None: short inputs stay quiet
    assert "Batches" not in capsys.readouterr().err


def test_half_precision_stays_fp32_on_cpu_and_outputs_float32(minilm_dir, caplog):
    embedder = minibge.load_embedder(minilm_dir, dtype="float16", device="cpu")
    assert embedder.model.embeddings.word_embeddings.weight.dtype == torch.float32
    assert "using float32" in caplog.text
    with pytest.raises(ValueError, match="unknown dtype"):
        minibge.load_embedder(minilm_dir, dtype="float8")
    # a bf16 model (as on CUDA) still hands numpy float32 back, close to the fp32 result
    reference = embedder.encode(["a sentence about cats"])
    embedder.model.to(torch.bfloat16)
    half = embedder.encode(["a sentence about cats"])
    assert half.dtype == np.float32 and float(half[0] @ reference[0]) > 0.99


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_the_cpu_only_where_it_multiplies_in_hardware(minilm_dir, monkeypatch, native):
    monkeypatch.setattr("minibge.common.cpu_has_native_bf16", lambda: native)
    if not native:
        with pytest.raises(ValueError, match="emulated"):
            minibge.load_embedder(minilm_dir, dtype="bfloat16", device="cpu")
        return
    texts = ["a sentence about cats", "Giant pandas eat bamboo.", "x"]
    bf16 = minibge.load_embedder(minilm_dir, dtype="bfloat16", device="cpu")
    assert bf16.model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert bf16.fast_path_blocker() is None, "a bf16 model still takes the fast backend"
    got, ref = bf16.encode(texts), minibge.load_embedder(minilm_dir, device="cpu").encode(texts)
    cos = (got * ref).sum(1)
    # bf16 products, fp32 residual stream (fast/encoder.py): 1 − cos ≤ 1e-4 on the STS-B test in
    # docs/benchmarks.md; bf16 throughout moved these vectors by up to 0.004
    assert got.dtype == np.float32 and cos.min() > 1 - 5e-4, f"bf16 vs fp32: min cosine {cos.min():.6f}"


def test_bge_defaults_cls_pooling_and_instruction(fake_bge):
    embedder = minibge.load_embedder(fake_bge("bge-small-en-v1.5"))
    assert embedder.pooling == "cls" and embedder.max_length == 512
    assert embedder.query_instruction == INSTRUCTION_EN
    queries = ["what is a panda?", "how tall is everest"]
    with_instruction = embedder.encode_queries(queries)
    assert np.allclose(with_instruction, embedder.encode([INSTRUCTION_EN + q for q in queries]), atol=1e-6)
    assert np.allclose(embedder.encode_corpus(queries), embedder.encode(queries), atol=1e-6)
    assert not np.allclose(with_instruction, embedder.encode(queries), atol=1e-3)
    assert np.allclose(embedder.encode_queries(queries[0]), with_instruction[0], atol=1e-6)
    assert minibge.load_embedder(fake_bge("bge-base-zh-v1.5")).query_instruction == INSTRUCTION_ZH
    custom = minibge.load_embedder(fake_bge("my-model"), query_instruction="query: ")
    assert custom.query_instruction == "query: "
    assert np.allclose(custom.encode_queries(["x"]), custom.encode(["query: x"]), atol=1e-6)


def test_cls_embedding_equals_transformers_cls(fake_bge):
    from transformers import AutoModel, AutoTokenizer
    folder = fake_bge()
    embedder = minibge.load_embedder(folder)
    texts = ["embedding", "I love machine learning and nlp"]
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state[:, 0]
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    ours = embedder.encode(texts)
    assert np.abs(ours - ref).max() < 1e-5, f"max |diff| {np.abs(ours - ref).max():.3e}"


def test_pooling_config_spellings(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text('{"word_embedding_dimension": 8, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    assert read_pooling_mode(tmp_path) == "cls"
    config.write_text('{"embedding_dimension": 8, "pooling_mode": "mean"}')
    assert read_pooling_mode(tmp_path) == "mean"
    config.write_text('{"pooling_mode": "max"}')
    with pytest.raises(ValueError, match="supports"):
        read_pooling_mode(tmp_path)


def test_missing_path_and_unknown_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBGE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("MINIBGE_HUB_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubError, match="no such model folder"):
        minibge.load_embedder(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(HubError):
        minibge.load_embedder("BAAI/bge-nonexistent-v9")


# -----------------------------------------------------------------------------
# Saving a whole embedder, and embedding with gradients

def min_cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


ROUND_TRIP_TEXTS = ["A man is playing a guitar.", "how do giant pandas eat bamboo?", "x", "",
                    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 40]  # > 256 tokens


def assert_reloads_alike(embedder, folder):
    """load_embedder, SentenceTransformer and transformers' AutoModel give the base model's vectors."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    base_corpus, base_queries = embedder.encode_corpus(ROUND_TRIP_TEXTS), embedder.encode_queries(ROUND_TRIP_TEXTS)
    reloaded = minibge.load_embedder(folder)
    assert (reloaded.pooling, reloaded.max_length, reloaded.query_instruction) == \
        (embedder.pooling, embedder.max_length, embedder.query_instruction)
    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == embedder.max_length
    for name, corpus, queries in [
        ("load_embedder", reloaded.encode_corpus(ROUND_TRIP_TEXTS), reloaded.encode_queries(ROUND_TRIP_TEXTS)),
        ("SentenceTransformer", st.encode(ROUND_TRIP_TEXTS), st.encode(ROUND_TRIP_TEXTS, prompt_name="query")),
    ]:
        for what, ours, base in (("corpus", corpus, base_corpus), ("queries", queries, base_queries)):
            assert min_cosine(ours, base) >= 0.999999, \
                f"{name} {what}: min cosine {min_cosine(ours, base):.9f}, max |diff| {np.abs(ours - base).max():.3e}"
    hf_model = AutoModel.from_pretrained(folder).eval()
    batch = embedder.tokenize(ROUND_TRIP_TEXTS)
    with torch.no_grad():
        ref, ours = hf_model(**batch).last_hidden_state, embedder.model(**batch)
    assert torch.allclose(ref, ours, atol=1e-5), f"AutoModel: max |diff| {(ref - ours).abs().max():.3e}"


@pytest.mark.slow  # real MiniLM through three libraries
def test_save_pretrained_round_trip_mean_pooling(minilm, tmp_path):
    folder = minilm.save_pretrained(tmp_path / "saved")
    assert minilm.pooling == "mean" and minilm.max_length == 256
    assert_reloads_alike(minilm, folder)


def test_save_pretrained_round_trip_cls_with_instruction(fake_bge, tmp_path):
    embedder = minibge.load_embedder(fake_bge("bge-small-en-v1.5"))
    assert embedder.pooling == "cls" and embedder.query_instruction == INSTRUCTION_EN
    # a folder name that says nothing about BGE: the instruction must travel in the files
    folder = embedder.save_pretrained(tmp_path / "my-finetuned-model")
    assert_reloads_alike(embedder, folder)


def test_saved_without_instruction_stays_without(fake_bge, tmp_path):
    embedder = minibge.load_embedder(fake_bge("bge-small-en-v1.5"), query_instruction="")
    folder = embedder.save_pretrained(tmp_path / "bge-small-en-v1.5-noinstruct")
    assert minibge.load_embedder(folder).query_instruction is None


def test_embed_carries_gradients_and_matches_encode(minilm):
    texts = ["a first sentence", "and a somewhat longer second sentence", "three"]
    reference = minilm.encode(texts)
    embedded = minilm.embed(texts)
    assert embedded.requires_grad and embedded.shape == (3, 384)
    assert np.abs(embedded.detach().numpy() - reference).max() < 1e-5
    embedded.sum().backward()
    no_grad = [name for name, p in minilm.model.named_parameters() if p.grad is None and not name.startswith("pooler.")]
    assert not no_grad, f"no gradient reached {no_grad}"  # the pooler is not part of the embedding
    minilm.model.zero_grad(set_to_none=True)
    batch = minilm.tokenize(texts, max_length=4)
    assert batch["input_ids"].shape == (3, 4)
    assert torch.allclose(minilm.embed(batch, normalize=False), minilm.embed(texts, max_length=4, normalize=False))
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        minilm.embed({"input_ids": batch["input_ids"]})
    with pytest.raises(TypeError, match="max_length must be an int"):
        minilm.embed(texts, max_length="8")
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(texts, batch_size=True)


# -----------------------------------------------------------------------------
# Real BGE weights: only when someone has placed them under weights/ (the Hub is unreachable here)

BGE_BASE = WEIGHTS_DIR / "bge-base-en-v1.5"


@pytest.mark.skipif(not (BGE_BASE / "config.json").exists(), reason="weights/bge-base-en-v1.5 not present")
def test_real_bge_base_published_reference():
    # FlagEmbedding tutorial 1.2.3 (bge-base-en-v1.5, fp32, no instruction)
    embedder = minibge.load_embedder(BGE_BASE, device="cpu")
    assert embedder.tokenizer.encode_batch(["embedding"], 512)[0] == [101, 7861, 8270, 4667, 102]
    a, b = embedder.encode(["embedding", "I love machine learning and nlp"])
    assert np.allclose(a[:3], [0.014549762, -0.0096840411, 0.0037761475], atol=1e-5), a[:3]
    assert abs(float(a @ b) - 0.6077381) < 1e-5, float(a @ b)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), max_size=40), max_tokens=st.integers(1, 120) | st.none(),
       batch_size=st.integers(1, 9))
def test_length_sorted_batches_cover_everything_longest_first_within_budget(lengths, max_tokens, batch_size):
    batches = length_sorted_batches(lengths, batch_size, max_tokens)
    order = [int(i) for b in batches for i in b]
    assert sorted(order) == list(range(len(lengths))), "every position exactly once"
    # longest first, and equal lengths in input order (a stable sort: deterministic batches)
    assert order == sorted(range(len(lengths)), key=lambda i: -lengths[i]), (lengths, order)
    for b in batches:
        assert 1 <= len(b) <= batch_size
        if max_tokens is not None:
            assert len(b) == 1 or sum(lengths[i] for i in b) <= max_tokens, (list(b), max_tokens)
