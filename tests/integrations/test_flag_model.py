"""minibge.FlagModel: FlagEmbedding's API, checked on the vectors against the Embedder underneath."""
import logging

import numpy as np
import pytest
import torch

import minibge
from minibge import FlagModel
from minibge.embedder import INSTRUCTION_EN, INSTRUCTION_ZH

# The FlagEmbedding snippet of BGE's model card, character for character
CARD_SNIPPET = """\
from FlagEmbedding import FlagModel
sentences_1 = ["样例数据-1", "样例数据-2"]
sentences_2 = ["样例数据-3", "样例数据-4"]
model = FlagModel('BAAI/bge-large-zh-v1.5', query_instruction_for_retrieval="为这个句子生成表示以用于检索相关文章：", use_fp16=True)
embeddings_1 = model.encode(sentences_1)
embeddings_2 = model.encode(sentences_2)
similarity = embeddings_1 @ embeddings_2.T
queries = ['query_1', 'query_2']
passages = ["样例文档-1", "样例文档-2"]
q_embeddings = model.encode_queries(queries)
p_embeddings = model.encode_corpus(passages)
scores = q_embeddings @ p_embeddings.T
"""
QUERIES = ["what is a panda?", "how tall is mount everest"]
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 20  # ~180 tokens


def assert_close(actual, expected, what, atol=1e-6):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    diff = np.abs(actual - expected)
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3e}, mean |diff| {diff.mean():.3e}"


def assert_differ(a, b, what, min_diff=1e-3):
    diff = np.abs(np.asarray(a) - np.asarray(b)).max()
    assert diff > min_diff, f"{what}: expected different vectors, max |diff| only {diff:.3e}"


def test_card_snippet_runs_with_only_the_import_changed(fake_bge, caplog):
    folder = fake_bge("bge-large-zh-v1.5")
    code = CARD_SNIPPET.replace("from FlagEmbedding import", "from minibge import") \
                       .replace("'BAAI/bge-large-zh-v1.5'", repr(str(folder)))
    assert code.count("minibge") == 1 and str(folder) in code
    namespace = {}
    with caplog.at_level(logging.INFO):
        exec(code, namespace)
    embedder = namespace["model"].embedder
    dim = embedder.dimension
    for name in ("embeddings_1", "embeddings_2", "q_embeddings", "p_embeddings"):
        vectors = namespace[name]
        assert isinstance(vectors, np.ndarray) and vectors.shape == (2, dim) and vectors.dtype == np.float32, \
            f"{name}: {type(vectors).__name__} {getattr(vectors, 'shape', None)} {getattr(vectors, 'dtype', None)}"
        assert_close(np.linalg.norm(vectors, axis=1), np.ones(2), f"{name} norms", atol=1e-5)
    assert namespace["similarity"].shape == namespace["scores"].shape == (2, 2)

    # on the vectors: encode_queries carries the card's instruction, encode_corpus and encode never do
    queries, passages = namespace["queries"], namespace["passages"]
    assert_close(namespace["q_embeddings"], embedder.encode([INSTRUCTION_ZH + q for q in queries]), "encode_queries")
    assert_differ(namespace["q_embeddings"], embedder.encode(queries), "encode_queries vs bare queries")
    assert_close(namespace["p_embeddings"], embedder.encode(passages), "encode_corpus")
    assert_close(namespace["embeddings_1"], embedder.encode(namespace["sentences_1"]), "encode")

    if embedder.device.type == "cpu":  # use_fp16=True on a CPU: float32 weights, quietly, as FlagEmbedding
        assert next(embedder.model.parameters()).dtype == torch.float32
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [], warnings
        assert any("float32" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_no_instruction_unless_given(fake_bge):
    """FlagEmbedding's meaning of None, not the embedder's (which picks BGE's instruction by model name)."""
    folder = fake_bge("bge-small-en-v1.5")
    embedder = minibge.load_embedder(folder)
    assert embedder.query_instruction == INSTRUCTION_EN
    plain = FlagModel(folder)
    assert_close(plain.encode_queries(QUERIES), embedder.encode(QUERIES), "no instruction given")
    assert_differ(plain.encode_queries(QUERIES), embedder.encode([INSTRUCTION_EN + q for q in QUERIES]),
                  "no instruction given vs BGE's")

    model = FlagModel(folder, query_instruction_for_retrieval="query: ")
    queries = model.encode_queries(QUERIES)
    assert_close(queries, embedder.encode(["query: " + q for q in QUERIES]), "custom instruction")
    assert_close(model.encode_queries(QUERIES[0]), queries[0], "one query as a str")
    assert_close(model.encode_corpus(QUERIES), embedder.encode(QUERIES), "encode_corpus: no instruction")
    assert_close(model.encode(QUERIES), embedder.encode(QUERIES), "encode: no instruction")
    model.query_instruction_for_retrieval = None  # changed after construction, as FlagEmbedding allows
    assert_close(model.encode_queries(QUERIES), embedder.encode(QUERIES), "instruction set to None later")


def test_pooling_method_wins_over_the_folder(fake_bge):
    folder = fake_bge("bge-small-en-v1.5")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}')
    assert minibge.load_embedder(folder).pooling == "mean"
    cls_model, mean_model = FlagModel(folder), FlagModel(folder, pooling_method="mean")
    assert cls_model.embedder.pooling == "cls" and mean_model.embedder.pooling == "mean"
    assert_close(cls_model.encode(QUERIES), minibge.load_embedder(folder, pooling="cls").encode(QUERIES), "cls")
    assert_close(mean_model.encode(QUERIES), minibge.load_embedder(folder).encode(QUERIES), "mean")
    assert_differ(cls_model.encode(QUERIES), mean_model.encode(QUERIES), "cls vs mean")
    assert error_of(FlagModel, folder, pooling_method="max") == error_of(minibge.load_embedder, folder, pooling="max")


def test_real_minilm_with_mean_pooling_is_the_embedder(minilm_dir):
    texts = ["A man is eating food.", "A man is riding a horse.", LONG_TEXT]
    model = FlagModel(minilm_dir, pooling_method="mean")
    reference = minibge.load_embedder(minilm_dir)  # mean pooling from the folder; matches sentence-transformers
    assert_close(model.encode(texts), reference.encode(texts), "FlagModel vs Embedder on all-MiniLM-L6-v2")


def test_per_call_options_follow_flagembedding(fake_bge):
    folder = fake_bge("bge-small-en-v1.5")
    model = FlagModel(folder, query_instruction_for_retrieval=INSTRUCTION_EN, query_max_length=8,
                      passage_max_length=16, batch_size=2)
    embedder, dim = model.embedder, model.embedder.dimension
    texts = [LONG_TEXT, "short", "a little longer text"]

    assert model.encode("one").shape == (dim,) and model.encode(["one"]).shape == (1, dim)
    assert model.encode([]).shape == (0, dim)
    tensor = model.encode(texts, convert_to_numpy=False)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, dim)
    assert isinstance(model.encode("one", convert_to_numpy=False), torch.Tensor)
    assert isinstance(FlagModel(folder, convert_to_numpy=False).encode(texts), torch.Tensor)

    # queries are cut at query_max_length, passages and plain encode at passage_max_length
    assert_close(model.encode_queries([LONG_TEXT]), embedder.encode([INSTRUCTION_EN + LONG_TEXT], max_length=8),
                 "encode_queries at query_max_length")
    assert_close(model.encode_corpus([LONG_TEXT]), embedder.encode([LONG_TEXT], max_length=16),
                 "encode_corpus at passage_max_length")
    assert_close(model.encode([LONG_TEXT]), embedder.encode([LONG_TEXT], max_length=16), "encode")
    assert_close(model.encode([LONG_TEXT], max_length=64), embedder.encode([LONG_TEXT], max_length=64),
                 "max_length= in the call")
    assert_differ(model.encode([LONG_TEXT], max_length=64), model.encode([LONG_TEXT]), "64 vs 16 tokens")
    assert_close(model.encode(texts, batch_size=1), model.encode(texts), "batch_size=1")

    raw = FlagModel(folder, normalize_embeddings=False).encode(texts)
    assert_close(raw, embedder.encode(texts, max_length=512, normalize_embeddings=False), "unnormalised")
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-2


SURROGATE = ["lone \ud800 surrogate"]  # no UTF-8 form: the tokenizer names the position
BAD_INPUTS = [None, 3, b"bytes", [1], ["fine", None], ("fine", 2.5), {"a set"}, SURROGATE]


def error_of(call, *args, **kwargs):
    with pytest.raises((TypeError, ValueError)) as info:
        call(*args, **kwargs)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=repr)
def test_bad_input_gets_the_embedders_error(fake_bge, bad):
    model = FlagModel(fake_bge("bge-small-en-v1.5"), query_instruction_for_retrieval="query: ")
    embedder = model.embedder
    expected = error_of(embedder.encode, bad)
    assert error_of(model.encode, bad) == expected
    assert error_of(model.encode_corpus, bad) == expected
    # queries are checked before the instruction is added, by the embedder's encode_queries
    assert error_of(model.encode_queries, bad) == error_of(embedder.encode_queries, bad)
    if bad != SURROGATE:  # for a surrogate the position counts the instruction's characters too
        assert error_of(model.encode_queries, bad) == expected


def test_bad_options_get_the_embedders_error(fake_bge):
    model = FlagModel(fake_bge("bge-small-en-v1.5"))
    for options in (dict(batch_size=0), dict(batch_size=2.0), dict(max_length=1)):
        assert error_of(model.encode, ["a"], **options) == error_of(model.embedder.encode, ["a"], **options)


def test_devices(fake_bge):
    folder = fake_bge("bge-small-en-v1.5")
    assert FlagModel(folder, devices="cpu").embedder.device.type == "cpu"
    assert FlagModel(folder, devices=["cpu"]).embedder.device.type == "cpu"
    with pytest.raises(ValueError, match="one device"):
        FlagModel(folder, devices=["cuda:0", "cuda:1"])
    with pytest.raises(TypeError, match="devices"):
        FlagModel(folder, devices=1.5)


# ---------------------------------------------------------------- FlagEmbedding 1.4's full signature
FLAG_EMBEDDING_1_4 = ["model_name_or_path", "normalize_embeddings", "use_fp16", "use_bf16",
                      "query_instruction_for_retrieval", "query_instruction_format", "devices", "pooling_method",
                      "trust_remote_code", "cache_dir", "batch_size", "query_max_length", "passage_max_length",
                      "convert_to_numpy", "kwargs"]


def test_signature_is_flagembeddings_in_its_order():
    import inspect
    parameters = inspect.signature(FlagModel).parameters
    assert list(parameters) == FLAG_EMBEDDING_1_4
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert defaults == dict(normalize_embeddings=True, use_fp16=True, use_bf16=False,
                            query_instruction_for_retrieval=None, query_instruction_format="{}{}", devices=None,
                            pooling_method="cls", trust_remote_code=False, cache_dir=None, batch_size=256,
                            query_max_length=512, passage_max_length=512, convert_to_numpy=True)
    for method in ("encode", "encode_queries", "encode_corpus"):
        names = list(inspect.signature(getattr(FlagModel, method)).parameters)
        assert names[2:5] == ["batch_size", "max_length", "convert_to_numpy"] and names[-1] == "kwargs", names


def test_positional_arguments_mean_what_they_mean_in_flagembedding(fake_bge):
    folder = fake_bge("bge-small-en-v1.5")
    raw = FlagModel(folder, False)  # normalize_embeddings=False, not an instruction
    assert raw.normalize_embeddings is False and raw.query_instruction_for_retrieval is None
    assert_close(raw.encode(QUERIES), raw.embedder.encode(QUERIES, normalize_embeddings=False), "positional")


def test_instruction_formats_and_passage_instruction(fake_bge):
    folder = fake_bge("bge-small-en-v1.5")
    model = FlagModel(folder, query_instruction_for_retrieval="Given a question",
                      query_instruction_format="<instruct>{}\\n<query>{}",  # a literal \n, as in a config file
                      passage_instruction_for_retrieval="passage: ")
    embedder = model.embedder
    assert_close(model.encode_queries(QUERIES), embedder.encode([f"<instruct>Given a question\n<query>{q}" for q in QUERIES]),
                 "query_instruction_format")
    assert_close(model.encode_corpus(QUERIES), embedder.encode(["passage: " + q for q in QUERIES]), "passage instruction")
    assert_close(model.encode(QUERIES, instruction="x", instruction_format="{1} [{0}]"),
                 embedder.encode([f"{q} [x]" for q in QUERIES]), "encode(instruction=, instruction_format=)")
    with pytest.raises(ValueError, match="two {} fields"):
        FlagModel(folder, query_instruction_format="{}{}{}")


def test_every_parameter_works_or_says_why_not(fake_bge, tmp_path):
    folder = fake_bge("bge-small-en-v1.5")
    with pytest.raises(ValueError, match="runs no code from a model folder"):
        FlagModel(folder, trust_remote_code=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['colbert_dim'\]"):
        FlagModel(folder, colbert_dim=128)
    model = FlagModel(folder, use_bf16=True, devices="cpu")  # bf16 on a CPU: float32, as fp16
    assert next(model.embedder.model.parameters()).dtype == torch.float32 and model.use_bf16 is False
    assert_close(model.encode(QUERIES, device="cpu"), model.embedder.encode(QUERIES), "encode(device=)")
    with pytest.raises(TypeError, match=r"\['padding'\].*tokenizer"):
        model.encode(QUERIES, padding="max_length")
    with pytest.raises(TypeError, match=r"\['truncation'\]"):
        model.encode_queries(QUERIES, truncation=True)
    # cache_dir: a Hub id is looked up there (and would be downloaded there)
    cache = tmp_path / "cache"
    cache.mkdir()
    folder.rename(cache / "bge-small-en-v1.5")
    cached = FlagModel("BAAI/bge-small-en-v1.5", cache_dir=str(cache))
    assert cached.embedder.name == str(cache / "bge-small-en-v1.5")


def test_flag_auto_model_from_finetuned(fake_bge, tmp_path):
    from minibge import FlagAutoModel
    folder = fake_bge("bge-base-en-v1.5")
    model = FlagAutoModel.from_finetuned(str(folder), query_instruction_for_retrieval=INSTRUCTION_EN)
    assert isinstance(model, FlagModel) and model.embedder.pooling == "cls"
    assert_close(model.encode_queries(QUERIES), model.embedder.encode([INSTRUCTION_EN + q for q in QUERIES]), "auto")
    checkpoint = folder / "checkpoint-100"  # a Trainer checkpoint: named by its parent, as in FlagEmbedding
    checkpoint.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (checkpoint / f.name).write_bytes(f.read_bytes())
    assert FlagAutoModel.from_finetuned(str(checkpoint)).query_instruction_for_retrieval is None
    renamed = folder.rename(tmp_path / "my-finetune")
    with pytest.raises(ValueError, match="model_class='encoder-only-base'"):
        FlagAutoModel.from_finetuned(str(renamed))
    assert FlagAutoModel.from_finetuned(str(renamed), model_class="encoder-only-base").embedder.pooling == "cls"
    with pytest.raises(ValueError, match="BERT-based BGE models only"):
        FlagAutoModel.from_finetuned(str(renamed), model_class="encoder-only-m3")
    with pytest.raises(ValueError, match="bge-m3 is not a BERT model"):
        FlagAutoModel.from_finetuned(str(tmp_path / "bge-m3"))
    with pytest.raises(EnvironmentError):
        FlagAutoModel()
