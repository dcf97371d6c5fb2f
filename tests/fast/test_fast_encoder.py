"""minibge.fast computes what the plain model computes: every speed path against the plain path.

The bar is the issue's: per-text cosine ≥ 0.99999 in fp32 (in practice the differences are float
rounding, ~1e-7), and the hidden states of real tokens within 1e-5.
"""
import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import TINY, random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from minibge import BertConfig, BertModel, Embedder, cls_pool, load_embedder, mean_pool
from minibge.evaluate.data import load_sts_csv
from minibge.fast import encoder as fast_path
from minibge.fast import ATTENTION_MODES, FastEncoder, Packing, speed_options
from minibge.fast import onednn as onednn_kernels
from minibge.fast.int8 import Int8Linear, save_calibration
from minibge.lab import MISTAKES, with_mistake

COSINE_BAR = 0.99999
CPU_MODES = tuple(mode for mode in ATTENTION_MODES if mode != "varlen")  # varlen: CUDA's Flash kernel only


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**TINY, **overrides})).eval()


MODEL = tiny_model()


def min_cosine(a, b):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def assert_same_hidden(fast_out, ref, mask, what):
    real = mask.bool()
    diff = (fast_out - ref)[real].abs()
    assert diff.max() < 1e-5, f"{what}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
    assert fast_out[~real].abs().sum() == 0, f"{what}: padded positions are not zero"
    cos = min_cosine(fast_out[:, 0], ref[:, 0])
    assert cos >= COSINE_BAR, f"{what}: min CLS cosine {cos:.8f}"


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), seq_len=st.integers(2, 24), seed=st.integers(0, 10_000),
       mode=st.sampled_from(CPU_MODES), fuse=st.booleans(), onednn=st.booleans(), prepack=st.booleans(),
       with_types=st.booleans())
def test_fast_encoder_equals_model(batch, seq_len, seed, mode, fuse, onednn, prepack, with_types):
    ids, mask, types = random_batch(MODEL.config, batch, seq_len, seed=seed)
    mask[:, 0] = 1  # every text has at least its [CLS]
    types = types if with_types else None
    with torch.inference_mode():
        ref = MODEL(ids, mask, types)
        out = FastEncoder(MODEL, attention=mode, fuse_qkv=fuse, onednn=onednn, prepack=prepack)(ids, mask, types)
    assert_same_hidden(out, ref, mask, f"attention={mode} fuse_qkv={fuse} onednn={onednn} prepack={prepack}")


def test_fast_encoder_without_mask_and_with_left_padding():
    ids, _, _ = random_batch(MODEL.config, 3, 9, seed=3)
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [0, 0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.inference_mode():
        assert_same_hidden(FastEncoder(MODEL)(ids), MODEL(ids), torch.ones_like(ids), "no mask")
        # positions stay the model's absolute 0..T-1 whatever the padding side, as in model()
        for mode in CPU_MODES:
            out, ref = FastEncoder(MODEL, attention=mode)(ids, left), MODEL(ids, left)
            assert (out - ref)[left.bool()].abs().max() < 1e-5, f"left padding, {mode}"


def test_fused_qkv_is_one_linear_with_stacked_weights():
    attention = MODEL.layers[1].attention
    x = torch.randn(5, MODEL.config.hidden_size)
    expected = torch.cat([attention.query(x), attention.key(x), attention.value(x)], dim=-1)
    fused = FastEncoder(MODEL, onednn=False).linears[1]["qkv"]
    assert fused.weight.shape == (3 * MODEL.config.hidden_size, MODEL.config.hidden_size)
    with torch.inference_mode():
        for onednn in (False, True):
            fast = FastEncoder(MODEL, onednn=onednn)
            got = fast.matmul(fast.linears[1]["qkv"], x)
            assert torch.allclose(got, expected, atol=1e-5), f"onednn={onednn}: {(got - expected).abs().max():.3e}"


def reference_attention(q, k, v):
    """softmax(q kᵀ / √D) v in float64, the textbook formula."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def assert_close_to(got, ref, what, tol=1e-5):
    diff = (got.double() - ref).abs()
    assert diff.max() < tol, f"{what}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"


@pytest.mark.parametrize("L", [1, 6, 15, 16, 28, fast_path.SHORT_ATTENTION, fast_path.SHORT_ATTENTION + 1, 70])
@pytest.mark.parametrize("method", fast_path.SHORT_METHODS)
def test_every_short_group_method_is_attention(method, L):
    """Whichever method the measurement picks for a band, it computes attention: checked on q, k, v
    as the fast path hands them over (strided views of a packed q|k|v), beyond the bands too."""
    torch.manual_seed(L)
    q, k, v = fast_path.split_qkv(torch.randn(3, L, 3 * 4 * 8), num_heads=4)  # (b, heads, L, D) each
    ref = reference_attention(q, k, v)
    assert_close_to(fast_path.SHORT_ATTEND[method](q, k, v), ref, f"{method}, L={L}")
    plan = tuple((longest, method) for longest, _ in fast_path.SHORT_BANDS)
    assert_close_to(fast_path.dense_attention(q, k, v, plan=plan), ref, f"dense_attention with {method}, L={L}")


@pytest.mark.parametrize("route", [route for route in fast_path.ATTEND if route in CPU_MODES])
def test_every_cpu_attention_route_is_attention_per_sentence(route):
    """Every route (the candidates of attention="auto" on the CPU among them), on the packed batches they are timed on, with
    every short-group plan: each sentence attends over itself only, as the textbook formula says."""
    heads, D = 4, 8
    plans = [tuple(zip([band[0] for band in fast_path.SHORT_BANDS], methods))
             for methods in itertools.product(fast_path.SHORT_METHODS, repeat=len(fast_path.SHORT_BANDS))]
    for lengths in fast_path.ROUTE_BATCHES + ((40, 20, 20, 15, 1),):
        lengths = torch.tensor(lengths)
        packing = Packing.from_mask((torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long())
        qkv = torch.randn(packing.num_tokens, 3 * heads * D)                                 # (N, 3H)
        ref = torch.cat([fast_path.merge_heads(reference_attention(*fast_path.split_qkv(part[None], heads)))
                         for part in qkv.split(lengths.tolist())])                           # (N, H)
        for plan in (plans if route == "buckets" else [()]):
            got = fast_path.ATTEND[route](qkv, packing, heads, **({"plan": plan} if plan else {}))
            assert_close_to(got, ref, f"{route} {plan} on lengths {lengths.tolist()}")


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_fused_matmul_epilogues_equal_the_unfused_steps(act):
    from minibge.model import activation
    linear = MODEL.layers[0].feed_forward.up
    x, residual = torch.randn(7, linear.in_features), torch.randn(7, linear.out_features)
    fast = FastEncoder(MODEL)
    with torch.inference_mode():
        for kwargs in ({"act": activation(act)}, {"residual": residual}, {}):
            got, ref = fast.matmul(linear, x, **kwargs), fast_path.plain_matmul(linear, x, **kwargs)
            assert (got - ref).abs().max() < 1e-5, f"{act} {list(kwargs)}: max |diff| {(got - ref).abs().max():.3e}"


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 6), seq_len=st.integers(2, 20), seed=st.integers(0, 10_000),
       mode=st.sampled_from(CPU_MODES), onednn=st.booleans(), with_types=st.booleans())
def test_first_tokens_are_the_models_first_row(batch, seq_len, seed, mode, onednn, with_types):
    """first_tokens computes the last block for the [CLS] rows only: what cls pooling reads."""
    ids, mask, types = random_batch(MODEL.config, batch, seq_len, seed=seed)
    mask[:, 0] = 1
    types = types if with_types else None
    fast = FastEncoder(MODEL, attention=mode, onednn=onednn)
    with torch.inference_mode():
        got, ref = fast.first_tokens(ids, mask, types), MODEL(ids, mask, types)[:, 0]
    diff = (got - ref).abs()
    assert got.shape == (batch, MODEL.config.hidden_size)
    assert diff.max() < 1e-5, f"attention={mode} onednn={onednn}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"


def test_first_tokens_refuses_rows_that_do_not_start_at_position_0():
    ids, _, _ = random_batch(MODEL.config, 2, 5, seed=1)
    left = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode(), pytest.raises(ValueError, match="right-padded"):
        FastEncoder(MODEL).first_tokens(ids, left)
    with torch.inference_mode():  # no mask: every row is full
        got, ref = FastEncoder(MODEL).first_tokens(ids), MODEL(ids)[:, 0]
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cls_pooling_runs_first_tokens_and_mean_pooling_the_whole_output(minilm, pooling, monkeypatch):
    """encode() asks the fast encoder for the [CLS] rows only when the pooling reads nothing else."""
    called = []
    for name in ("forward", "first_tokens"):
        original = getattr(FastEncoder, name)
        monkeypatch.setattr(FastEncoder, name, lambda self, *a, _f=original, _n=name, **k: called.append(_n) or _f(self, *a, **k))
    model = tiny_model(seed=2, vocab_size=30522, max_position_embeddings=512)
    fast = Embedder(model, minilm.tokenizer, pooling=pooling, max_length=128)
    got = fast.encode(TEXTS, batch_size=4)
    ref = Embedder(model, minilm.tokenizer, pooling=pooling, max_length=128, fast=False).encode(TEXTS, batch_size=4)
    assert set(called) == {"first_tokens" if pooling == "cls" else "forward"}, called
    assert min_cosine(got, ref) >= COSINE_BAR, f"{pooling}: min cosine {min_cosine(got, ref):.8f}"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_the_fast_output_matches_pooling_the_model(pooling):
    """encode() pools both paths with the one pooling of model.py: the fast encoder's (B, T, H)
    output, zeros at padding, must pool to the model's vectors."""
    ids, mask, _ = random_batch(MODEL.config, 5, 11, seed=4)
    fast = FastEncoder(MODEL)
    pool = {"cls": cls_pool, "mean": mean_pool}[pooling]
    with torch.inference_mode():
        got, ref = pool(fast(ids, mask), mask), pool(MODEL(ids, mask), mask)
    assert (got - ref).abs().max() < 1e-5, f"{pooling}: max |diff| {(got - ref).abs().max():.3e}"


def test_packing_of_a_right_padded_mask():
    lengths = torch.tensor([4, 1, 3])
    mask = (torch.arange(4)[None, :] < lengths[:, None]).long()
    packing = Packing.from_mask(mask)
    assert packing.token_index.tolist() == [0, 1, 2, 3, 4, 8, 9, 10]
    assert packing.positions.tolist() == [0, 1, 2, 3, 0, 0, 1, 2]
    assert packing.offsets.tolist() == [0, 4, 5, 8] and packing.lengths.tolist() == [4, 1, 3]
    assert [L for L, _ in packing.buckets()] == [1, 3, 4]


def test_bad_attention_mode():
    with pytest.raises(ValueError, match="attention"):
        FastEncoder(MODEL, attention="flash")


# -----------------------------------------------------------------------------
# Texts in: encode() on the fast path against the plain path

@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_embedder(minilm_dir, device="cpu", fast=False)


@pytest.fixture(scope="module")
def stsb_texts(shared_data):
    s1, s2, _ = load_sts_csv(shared_data / "stsbenchmark" / "sts-test.csv")
    return list(dict.fromkeys(s1 + s2))[:60]


TEXTS = ["A man is playing a guitar.", "x", "", "how do giant pandas eat bamboo?",
         "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 30, "a b c d"]


def spy_fast_batches(monkeypatch) -> list:
    """Record every encode() that chose the fast backend (so a test can tell which path ran)."""
    calls, original = [], Embedder.batch_step

    def spy(self, *args, **kwargs):
        if self.fast_path_blocker() is None:
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Embedder, "batch_step", spy)
    return calls


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fast_encode_matches_plain_encode_tiny(minilm, pooling, monkeypatch):
    model = tiny_model(seed=1, vocab_size=30522, max_position_embeddings=512)
    plain = Embedder(model, minilm.tokenizer, pooling=pooling, max_length=128, fast=False)
    calls = spy_fast_batches(monkeypatch)
    for options in ({}, {"attention": "padded"}, {"attention": "nested", "fuse_qkv": False}, {"onednn": False}):
        fast = Embedder(model, minilm.tokenizer, pooling=pooling, max_length=128).use_fast_path(**options)
        fast.max_tokens, fast.sort_window = 40, 4  # forces several windows and batches
        got, ref = fast.encode(TEXTS, batch_size=3), plain.encode(TEXTS, batch_size=3)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert min_cosine(got, ref) >= COSINE_BAR, f"{options}: min cosine {min_cosine(got, ref):.8f}"
    assert len(calls) == 4, "encode() did not take the fast path"
    assert fast.encode("one string").shape == (plain.dimension,)
    with pytest.raises(ValueError, match="batch_size"):
        fast.encode(TEXTS, batch_size=0)


@pytest.mark.parametrize("attention", [mode if mode == "auto" else pytest.param(mode, marks=pytest.mark.slow)
                                       for mode in CPU_MODES])  # the tiny-model tests cover every mode quickly
def test_fast_encode_matches_plain_encode_real_minilm(minilm, minilm_dir, stsb_texts, attention, monkeypatch):
    fast = load_embedder(minilm_dir, device="cpu")  # the default: fast
    if attention != "auto":
        fast.use_fast_path(attention=attention)
    calls = spy_fast_batches(monkeypatch)
    got, ref = fast.encode(stsb_texts), minilm.encode(stsb_texts)
    assert calls, "encode() did not take the fast path"
    assert min_cosine(got, ref) >= COSINE_BAR, f"{attention}: min cosine {min_cosine(got, ref):.8f}"
    queries = fast.encode_queries(stsb_texts[:5], instruction="query: ")
    assert min_cosine(queries, minilm.encode_queries(stsb_texts[:5], instruction="query: ")) >= COSINE_BAR


def test_int8_keeps_the_vectors_and_leaves_the_model_alone(minilm, stsb_texts, minilm_dir, caplog):
    fast = speed_options(load_embedder(minilm_dir, device="cpu"), precision="int8", compile=False)
    # uncalibrated int8 keeps these texts within 0.005, not every short text (docs/benchmarks.md): it says so
    assert "int8 without calibration texts" in caplog.text
    assert fast.fast_path_blocker() is None  # int8 copies live in the fast encoder, the model is untouched
    assert all(type(m) is not Int8Linear for m in fast.model.modules()), "the shared model was quantised"
    assert all(isinstance(linear, Int8Linear) for linear in fast.fast_encoder.linears[0].values())
    assert fast.fast_encoder.tails is None, "compile=False: eager"
    got, ref = fast.encode(stsb_texts), minilm.encode(stsb_texts)
    cos = min_cosine(got, ref)
    assert 0.995 <= cos < 0.99999, f"int8 min cosine {cos:.6f}"  # 1 − cos ≤ 0.005, and visibly not exact
    with pytest.raises(ValueError, match="precision"):
        speed_options(fast, precision="fp8")
    with pytest.raises(ValueError, match="calibration is for precision='int8'"):
        speed_options(fast, precision="bf16", calibration=stsb_texts)


@pytest.mark.slow
def test_int8_compiled_and_smoothed(minilm, stsb_texts, minilm_dir, tmp_path):
    calibration_texts, texts = stsb_texts[::2], stsb_texts[1::2]
    ref = minilm.encode(texts)
    plain = speed_options(load_embedder(minilm_dir, device="cpu"), precision="int8")  # compiled by default
    smooth = speed_options(load_embedder(minilm_dir, device="cpu"), precision="int8", calibration=calibration_texts)
    for fast in (plain, smooth):
        encoder = fast.fast_encoder
        assert encoder.tails is not None and encoder.heads is not None, "int8 compiles the QKV and the tails"
    errors = {name: 1 - (fast.encode(texts) * ref).sum(axis=1) for name, fast in (("plain", plain), ("smooth", smooth))}
    report = {name: f"max {e.max():.5f}, mean {e.mean():.6f}" for name, e in errors.items()}
    assert errors["plain"].max() <= 0.005 and errors["smooth"].max() <= 0.005, report
    assert errors["smooth"].mean() < errors["plain"].mean(), f"smoothing did not help: {report}"
    # the calibration round-trips through a file, and gives the same matmuls (eager here)
    calibration = smooth.fast_encoder.int8_calibration
    assert set(calibration) == {f"{i}.{n}" for i in range(6) for n in ("qkv", "output", "up", "down")}
    path = save_calibration(calibration, tmp_path / "int8.safetensors")
    from_dict = speed_options(load_embedder(minilm_dir, device="cpu"), precision="int8", compile=False,
                              calibration=calibration).encode(texts[:20])
    from_file = speed_options(load_embedder(minilm_dir, device="cpu"), precision="int8", compile=False,
                              calibration=path).encode(texts[:20])
    assert np.array_equal(from_dict, from_file), "the calibration file gave other matmuls than its dict"
    # Inductor reorders the float steps around the rounding, so a few values land on the other side
    # of a level: the two differ by int8's own error scale, not more
    compiled_vs_eager = 1 - (smooth.encode(texts[:20]) * from_dict).sum(axis=1)
    assert compiled_vs_eager.max() < 2e-3, f"compiled vs eager int8: max 1 − cos {compiled_vs_eager.max():.2e}"


@pytest.mark.slow
def test_compiled_tails_match(minilm, stsb_texts, minilm_dir):
    fast = speed_options(load_embedder(minilm_dir, device="cpu"), compile=True)
    # the compiled path is the one encode() takes: one compiled tail per encoder layer
    encoder = fast.fast_encoder
    assert encoder.tails is not None and len(encoder.tails) == encoder.model.config.num_hidden_layers
    got, ref = fast.encode(stsb_texts), minilm.encode(stsb_texts)
    assert min_cosine(got, ref) >= COSINE_BAR, f"compiled: min cosine {min_cosine(got, ref):.8f}"
    # the last compiled tail on the [CLS] rows only (first_tokens: a different row count, same graph)
    ids, mask = (fast.tokenize(stsb_texts[:7])[key] for key in ("input_ids", "attention_mask"))
    with torch.inference_mode():
        first, full = encoder.first_tokens(ids, mask), minilm.model(ids, mask)[:, 0]
    assert (first - full).abs().max() < 1e-4, f"compiled first_tokens: max |diff| {(first - full).abs().max():.3e}"


# -----------------------------------------------------------------------------
# The gate: encode() takes the fast path only where it computes what the plain path computes

@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_every_lab_mistake_gives_the_same_vectors_on_both_paths(minilm, mistake):
    """minibge lab edits a model in 15 ways (weights, modules, forwards, pooling, train mode): encode()
    must give the plain path's vectors for each, whichever path the gate picks."""
    model = tiny_model(seed=3, vocab_size=30522, max_position_embeddings=512, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)  # dropout 0: "dropout on" stays deterministic
    pooling = mistake.pooling or "cls"
    fast = with_mistake(Embedder(model, minilm.tokenizer, pooling=pooling, max_length=64), mistake)
    plain = with_mistake(Embedder(model, minilm.tokenizer, pooling=pooling, max_length=64, fast=False), mistake)
    got, ref = fast.encode(TEXTS, batch_size=4), plain.encode(TEXTS, batch_size=4)
    cos = min_cosine(got, ref)
    assert cos >= COSINE_BAR, f"{mistake.name} (gate: {fast.fast_path_blocker()}): min cosine {cos:.8f}"
    norms = np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.allclose(norms, 1, atol=1e-5), f"{mistake.name}: vector lengths differ by up to {abs(norms - 1).max():.2e}"


def test_code_changes_close_the_gate_and_data_changes_do_not(minilm):
    def fresh():
        return Embedder(tiny_model(seed=4, vocab_size=30522), minilm.tokenizer, max_length=64)

    assert fresh().fast_path_blocker() is None
    assert Embedder(MODEL, minilm.tokenizer, fast=False).fast_path_blocker() == "fast=False"
    # data the fast path reads itself: weights, eps, activation, pooling
    embedder = fresh()
    embedder.model.layers[0].attention_norm.eps = 1e-5
    embedder.model.layers[0].feed_forward.act = torch.relu
    embedder.pooling = "mean"
    assert embedder.fast_path_blocker() is None

    class LoRALinear(torch.nn.Linear):
        pass

    class MyEmbedder(Embedder):
        def embed(self, texts_or_batch, max_length=None, normalize=True):
            return super().embed(texts_or_batch, max_length, normalize)

    changes = {
        "train mode": lambda e: e.model.train(),
        "manual attention": lambda e: e.model.set_attn_impl("manual"),
        "a subclassed Linear": lambda e: setattr(e.model.layers[1].attention, "query", LoRALinear(32, 32)),
        "a patched forward": lambda e: setattr(e.model.layers[0], "forward", e.model.layers[0].forward),
        "a forward hook": lambda e: e.model.layers[0].feed_forward.register_forward_hook(lambda *a: None),
        "an instance embed": lambda e: setattr(e, "embed", e.embed),
    }
    for what, change in changes.items():
        embedder = fresh()
        change(embedder)
        assert embedder.fast_path_blocker() is not None, what
    subclass = MyEmbedder(MODEL, minilm.tokenizer)
    assert "embed() is customised" == subclass.fast_path_blocker()


def test_a_swapped_linear_is_picked_up(minilm):
    model = tiny_model(seed=7, vocab_size=30522)
    fast = Embedder(model, minilm.tokenizer, max_length=64)
    plain = Embedder(model, minilm.tokenizer, max_length=64, fast=False)
    fast.encode(TEXTS)  # builds the fast encoder from the current Linears
    torch.manual_seed(8)
    block = model.layers[1]
    block.feed_forward.up = torch.nn.Linear(block.feed_forward.up.in_features, block.feed_forward.up.out_features)
    block.attention.output = torch.nn.Linear(block.attention.output.in_features, block.attention.output.out_features)
    got, ref = fast.encode(TEXTS), plain.encode(TEXTS)
    assert fast.fast_path_blocker() is None
    assert min_cosine(got, ref) >= COSINE_BAR, f"min cosine {min_cosine(got, ref):.8f} after swapping two Linears"


def test_fast_encoder_keeps_its_options_and_follows_the_model(minilm):
    embedder = Embedder(tiny_model(seed=5, vocab_size=30522), minilm.tokenizer, max_length=64)
    first = embedder.use_fast_path(attention="padded", fuse_qkv=False).fast_encoder
    assert embedder.fast_encoder is first  # built once, reused
    embedder.model = tiny_model(seed=6, vocab_size=30522)  # a new model: a new encoder, same options
    second = embedder.fast_encoder
    assert second is not first and second.model is embedder.model
    assert (second.attention, second.fuse_qkv) == ("padded", False)


def test_an_embedder_can_be_copied_and_pickled_after_encoding(minilm):
    """The tokenizer's lock and the packed oneDNN weights (opaque tensors) cannot be copied as they are;
    a copy gets its own lock and packs its own weights."""
    import copy
    import pickle
    embedder = Embedder(tiny_model(seed=8, vocab_size=30522), minilm.tokenizer, max_length=64)
    texts = ["a first text", "and a second, longer one", "three"]
    vectors = embedder.encode(texts)
    for how, clone in (("deepcopy", copy.deepcopy), ("pickle", lambda e: pickle.loads(pickle.dumps(e)))):
        other = clone(embedder)
        assert other.model is not embedder.model and other.fast_path_blocker() is None, how
        assert np.abs(other.encode(texts) - vectors).max() == 0, f"{how}: different vectors"
        assert other.fast_encoder.model is other.model, f"{how}: the copy's fast path runs the original model"


def test_a_write_through_data_needs_a_forced_sync():
    """The documented blind spot: `.data` writes bypass the version counter the signature reads."""
    model = tiny_model(seed=3)
    fast = FastEncoder(model)
    ids, mask, _ = random_batch(model.config, 2, 9, seed=1)
    model.layers[0].feed_forward.up.weight.data.mul_(3.0)  # no version bump
    with torch.inference_mode():
        ref = model(ids, mask)
        assert fast.weight_signature() == fast.built_from, "a .data write became visible: update the docs"
        fast.sync(force=True)
        assert_same_hidden(fast(ids, mask), ref, mask, "after sync(force=True)")


@pytest.mark.parametrize("onednn", [False, True])
def test_fused_weights_follow_training_and_dtype_changes(onednn):
    model = tiny_model(seed=2)
    fast = FastEncoder(model, onednn=onednn)
    ids, mask, _ = random_batch(model.config, 3, 10, seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(ids, mask).square().mean().backward()
    packed_before = dict(fast.packed_weights)
    assert len(packed_before) == (4 * model.config.num_hidden_layers if onednn and fast_path.onednn_kernels._op_works() else 0)
    optimizer.step()  # in place: the fused copy and packed weights are now stale until sync() sees the new versions
    model.eval()
    fast.sync()
    assert all(fast.packed_weights[linear] is not packed for linear, packed in packed_before.items()
               if linear in fast.packed_weights), "sync() kept a packed weight made before the step"
    with torch.inference_mode():
        assert_same_hidden(fast(ids, mask), model(ids, mask), mask, "after an optimizer step")
    model.double()
    fast.sync()
    assert fast.linears[0]["qkv"].weight.dtype == torch.float64  # float64: F.linear (oneDNN takes fp32 only)
    assert fast.packed_weights == {}, "fp32 packed weights kept for a float64 model"
    with torch.inference_mode():
        ids = ids[:, :4]
        assert (fast(ids) - model(ids)).abs().max() < 1e-10


# -----------------------------------------------------------------------------
# attention="varlen": CUDA's variable-length Flash kernel. Off CUDA I test what minibge hands it,
# with a stand-in kernel that checks its inputs and attends sentence by sentence in float32.

def fake_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, **_):
    N, heads, D = q.shape
    assert k.shape == v.shape == (N, heads, D), f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k), "offsets: int32 cu_seqlens, q = k"
    lengths = cu_seq_q.diff()
    assert cu_seq_q[0] == 0 and cu_seq_q[-1] == N and (lengths > 0).all(), f"offsets {cu_seq_q.tolist()}"
    assert max_q == max_k >= lengths.max(), f"max {max_q}/{max_k}, longest sentence {lengths.max()}"
    out = torch.empty_like(q)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        one = [t[start:end].transpose(0, 1).float() for t in (q, k, v)]                # (heads, L, D) each
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*one).transpose(0, 1).to(q.dtype)
    return out


def test_varlen_hands_the_kernel_the_packed_rows_and_offsets(monkeypatch):
    from torch.nn.attention import varlen
    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    lengths = torch.tensor([5, 1, 9, 9, 3])
    packing = Packing.from_mask((torch.arange(11)[None, :] < lengths[:, None]).long())  # (B, T=11): wider than any
    heads, D = 4, 8
    qkv = torch.randn(packing.num_tokens, 3 * heads * D, generator=torch.Generator().manual_seed(0))  # (N, 3H)
    ref = fast_path.attend_padded(qkv, packing, heads)                                                 # (N, H), fp32
    got = fast_path.attend_varlen(qkv.bfloat16(), packing, heads).float()
    diff = (got - ref).abs()
    assert diff.max() < 2e-2, f"varlen vs padded: max |diff| {diff.max():.3e}, mean {diff.mean():.3e} (bf16 inputs)"
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        fast_path.attend_varlen(qkv, packing, heads)


def bf16_model_and_reference(seed):
    """A bf16 model with LayerNorms that are not the identity (so a LayerNorm computed without its
    parameters shows), and the fp32 model with the very same (bf16-rounded) weights. Four layers: the
    residual stream's rounding, what the fp32 stream avoids, adds up over layers."""
    model = tiny_model(seed=seed, num_hidden_layers=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    model.to(torch.bfloat16)
    return model, copy.deepcopy(model).float()


def test_a_bf16_model_multiplies_in_bf16_and_keeps_the_rest_in_fp32():
    """On the CPU a bf16 model's products run in bf16, its residual stream, LayerNorm and attention
    in fp32 (fast/encoder.py, 5): closer to fp32 arithmetic on the same weights than the plain
    model's bf16-throughout, and no bf16 rounding of the residual stream left to see."""
    model, reference = bf16_model_and_reference(seed=21)
    ids, mask, _ = random_batch(model.config, 5, 20, seed=3)
    mask[:, 0] = 1
    real = mask.bool()
    fast = FastEncoder(model)
    with torch.inference_mode():
        out, exact, bf16_throughout = fast(ids, mask), reference(ids, mask), model(ids, mask).float()
    assert fast.mixed and out.dtype == torch.float32 and fast.kernel_report()[0][0] == "matmuls"
    diff, plain_diff = (out - exact)[real].abs(), (bf16_throughout - exact)[real].abs()
    report = f"max |diff| {diff.max():.3e}, mean {diff.mean():.3e}; bf16 throughout: max {plain_diff.max():.3e}, mean {plain_diff.mean():.3e}"
    assert diff.max() < 0.05 and diff.mean() < plain_diff.mean() / 2, report
    assert out[~real].abs().sum() == 0, "padded positions are not zero"
    # the residual stream is fp32: its values are not all representable in bf16
    assert not torch.equal(out[real], out[real].bfloat16().float()), "the output was rounded to bf16"
    if onednn_kernels.available(torch.ones(1, dtype=torch.bfloat16), bf16=True):
        assert len(fast.packed_weights) == 4 * len(model.layers), "bf16 weights not packed for oneDNN"
    # [CLS] rows only (first_tokens) compute the same
    with torch.inference_mode():
        first = fast.first_tokens(ids, mask)
    assert (first - out[:, 0]).abs().max() < 1e-4, f"first_tokens: max |diff| {(first - out[:, 0]).abs().max():.3e}"


def test_an_fp32_fast_encoder_turns_mixed_when_its_model_turns_bf16():
    """speed_options(precision="bf16") builds the encoder in fp32, then moves it to bf16: the next
    call rebuilds the matmuls for bf16 (sync) and runs them as a bf16 model's."""
    model, reference = bf16_model_and_reference(seed=22)
    fast = FastEncoder(reference)
    ids, mask, _ = random_batch(model.config, 3, 12, seed=4)
    mask[:, 0] = 1
    with torch.inference_mode():
        exact = fast(ids, mask)
        assert not fast.mixed
        fast.to(torch.bfloat16)
        out = fast(ids, mask)
        again = FastEncoder(model)(ids, mask)
    assert fast.mixed and out.dtype == torch.float32
    diff = (out - exact)[mask.bool()].abs()
    assert diff.max() < 0.05, f"bf16 vs fp32: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
    assert (out - again).abs().max() < 1e-5, "built in fp32 then moved, or built from a bf16 model: not the same"


@pytest.mark.slow
def test_compiled_tails_of_a_bf16_model_equal_its_eager_ones(caplog):
    """Built in fp32 and moved to bf16 before compiling, as speed_options(precision="bf16",
    compile=True) does: the graphs are compiled from the bf16 matmuls, not dropped on first use."""
    model, reference = bf16_model_and_reference(seed=23)
    fast = FastEncoder(reference).to(torch.bfloat16)
    fast.compile_tails()
    ids, mask, _ = random_batch(model.config, 4, 11, seed=8)
    mask[:, 0] = 1
    with torch.inference_mode():
        out, eager = fast(ids, mask), FastEncoder(model)(ids, mask)
    assert fast.tails is not None and "compiled block tails are dropped" not in caplog.text
    diff = (out - eager)[mask.bool()].abs()
    assert out.dtype == torch.float32 and diff.max() < 2e-2, f"compiled vs eager: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"


def test_varlen_is_refused_off_cuda():
    with pytest.raises(ValueError, match="CUDA variable-length Flash kernel; the model is on cpu"):
        FastEncoder(MODEL, attention="varlen")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Flash kernel)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_equals_padded_on_cuda(dtype):
    model = tiny_model(seed=7).to("cuda", dtype)
    ids, mask, _ = random_batch(model.config, 6, 24, seed=4)
    mask[:, 0] = 1
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode():
        ref = FastEncoder(model, attention="padded")(ids, mask).float()
        got = FastEncoder(model, attention="varlen")(ids, mask).float()
    diff = (got - ref)[mask.bool()].abs()
    assert diff.max() < 2e-2, f"{dtype}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
    assert got[~mask.bool()].abs().sum() == 0, "padded positions are not zero"


@pytest.mark.slow
def test_compiled_tails_are_dropped_when_the_weights_change(caplog):
    # int8: the compiled graphs hold int8 copies made from the weights they were compiled with
    model = tiny_model(seed=11)
    fast = FastEncoder(model, int8=True)
    fast.compile_tails()
    ids, mask, _ = random_batch(model.config, 3, 9, seed=5)
    mask[:, 0] = 1
    with torch.no_grad():  # new weights in place, as an optimizer step writes them (a new version)
        for linear in (model.layers[0].feed_forward.up, model.layers[0].feed_forward.down):
            linear.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out, ref = fast(ids, mask), FastEncoder(model, int8=True)(ids, mask)  # ref: int8 from the new weights, eager
    cos = min_cosine(out[:, 0], ref[:, 0])
    assert cos > 0.999, f"after a weight change: min CLS cosine {cos:.6f} to int8 made from the new weights"
    assert fast.tails is None and fast.heads is None, "stale compiled tails kept"
    assert "compiled block tails are dropped" in caplog.text


@pytest.mark.slow
def test_compiled_int8_encoder_compiles_nothing_more_after_compile_tails():
    """compile_tails warms up the graphs encode() uses: a batch, a lone text (one [CLS] row in the
    last block under first_tokens) and the full forward compile no new graph (a recompile costs
    seconds in the middle of an encode)."""
    from torch._dynamo.utils import counters
    model = tiny_model(seed=12)
    fast = FastEncoder(model, int8=True)
    fast.compile_tails()
    graphs = counters["stats"]["unique_graphs"]
    ids, mask, _ = random_batch(model.config, 4, 10, seed=6)
    with torch.inference_mode():
        first, full = fast.first_tokens(ids, mask), fast(ids, mask)
        lone = fast.first_tokens(ids[:1, :5])
        ref = FastEncoder(model, int8=True)(ids[:1, :5])[:, 0]  # eager int8
    assert counters["stats"]["unique_graphs"] == graphs, "encoding compiled a new graph after compile_tails"
    assert (first - full[:, 0]).abs().max() < 1e-4, f"first_tokens vs forward: max |diff| {(first - full[:, 0]).abs().max():.3e}"
    assert (lone - ref).abs().max() < 1e-4, f"a lone text: max |diff| {(lone - ref).abs().max():.3e}"


@pytest.mark.slow
def test_compiled_int8_encoder_is_not_frozen_even_when_freezing_is_on_globally():
    """Frozen, Inductor rewrites the int8 products into oneDNN's qlinear with int8 activations, a
    reference kernel (minutes per encode: docs/benchmarks.md); compile_tails keeps freezing off even
    where the user's process turned it on."""
    from torch._dynamo.utils import counters
    model = tiny_model(seed=13)
    fast = FastEncoder(model, int8=True)
    before = counters["inductor"]["qlinear_weight_prepack_matcher_count"]
    with torch._inductor.config.patch(freezing=True):
        fast.compile_tails()
        ids, mask, _ = random_batch(model.config, 3, 9, seed=7)
        with torch.inference_mode():
            out, ref = fast(ids, mask), FastEncoder(model, int8=True)(ids, mask)  # ref: eager int8
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == before, "int8 products rewritten into qlinear"
    diff = (out - ref)[mask.bool()].abs()
    assert diff.max() < 1e-3, f"compiled vs eager int8: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
    # a recompile after compile_tails (here forced by emptying Dynamo's cache) happens inside an
    # encode call, outside compile_tails: it must not freeze either
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        again = fast(ids, mask)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was recompiled: the test would prove nothing"
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == before, "a recompile rewrote the int8 products into qlinear"
    diff = (again - out)[mask.bool()].abs()
    assert diff.max() < 1e-4, f"recompiled vs compiled: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
