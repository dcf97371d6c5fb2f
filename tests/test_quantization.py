"""minibge.quantization and minibge.similarity against sentence-transformers, the reference.

Quantization must agree bit for bit (dtype, shape and every value) for every precision, with
ranges from the embeddings, from calibration_embeddings and given explicitly; similarity scores
to float32 rounding, with the same signs (negative distances).
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import require_module
from minibge.quantization import PRECISIONS, quantize_embeddings
from minibge.similarity import SIMILARITY_FUNCTIONS, similarity, similarity_pairwise

st_quantization = require_module("sentence_transformers.util.quantization")
st_similarity = require_module("sentence_transformers.util.similarity")

# floats as embeddings hold them: finite, with exact zeros, negative zeros and repeated values mixed in
values = st.one_of(st.floats(-2, 2, width=32), st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]))


def matrices(min_rows=2, max_rows=12, dtype=np.float32):
    shape = st.tuples(st.integers(min_rows, max_rows), st.integers(1, 20))
    return hnp.arrays(dtype, shape, elements=values)


def assert_identical(ours, theirs, what=""):
    assert isinstance(ours, np.ndarray), f"{what}: got {type(ours).__name__}"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: {ours.dtype}{ours.shape} vs sentence-transformers {theirs.dtype}{theirs.shape}"
    differ = np.flatnonzero(ours.ravel() != theirs.ravel())
    assert differ.size == 0, (f"{what}: {differ.size} of {ours.size} values differ, first at {differ[0]}: "
                              f"{ours.ravel()[differ[0]]} vs {theirs.ravel()[differ[0]]}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(embeddings=matrices(), precision=st.sampled_from(PRECISIONS))
def test_quantize_from_own_ranges_equals_sentence_transformers(embeddings, precision):
    assert_identical(quantize_embeddings(embeddings, precision),
                     st_quantization.quantize_embeddings(embeddings, precision), precision)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(embeddings=matrices(min_rows=1), data=st.data(), precision=st.sampled_from(PRECISIONS),
       calibration_dtype=st.sampled_from([np.float32, np.float64]))
def test_quantize_with_calibration_equals_sentence_transformers(embeddings, data, precision, calibration_dtype):
    # a calibration set of any size (one row included) and another dtype, outside the embeddings' range too
    rows = data.draw(st.integers(1, 15))
    calibration = data.draw(hnp.arrays(calibration_dtype, (rows, embeddings.shape[1]), elements=values))
    ours = quantize_embeddings(embeddings, precision, calibration_embeddings=calibration)
    theirs = st_quantization.quantize_embeddings(embeddings, precision, calibration_embeddings=calibration)
    assert_identical(ours, theirs, f"{precision} with calibration")


@settings(max_examples=40, deadline=None)
@given(embeddings=matrices(min_rows=1), data=st.data(), precision=st.sampled_from(["int8", "uint8"]))
def test_quantize_with_explicit_ranges_and_one_vector(embeddings, data, precision):
    low = data.draw(hnp.arrays(np.float64, embeddings.shape[1], elements=st.floats(-2, 0)))
    ranges = np.vstack([low, low + data.draw(hnp.arrays(np.float64, embeddings.shape[1], elements=st.floats(0, 3)))])
    for x in (embeddings, embeddings[0]):  # a (D,) vector quantizes with given ranges
        assert_identical(quantize_embeddings(x, precision, ranges=ranges),
                         st_quantization.quantize_embeddings(x, precision, ranges=ranges), precision)


@settings(max_examples=30, deadline=None)
@given(embeddings=matrices(dtype=np.float64), precision=st.sampled_from(PRECISIONS))
def test_quantize_float64_and_torch_inputs(embeddings, precision):
    assert_identical(quantize_embeddings(embeddings, precision),
                     st_quantization.quantize_embeddings(embeddings, precision), f"float64 {precision}")
    tensor = torch.from_numpy(embeddings).to(torch.bfloat16)
    assert_identical(quantize_embeddings(tensor, precision),
                     st_quantization.quantize_embeddings(tensor, precision), f"bfloat16 tensor {precision}")


@settings(max_examples=30, deadline=None)
@given(data=st.data(), precision=st.sampled_from(PRECISIONS))
def test_quantize_list_of_token_matrices_shares_ranges(data, precision):
    dim = data.draw(st.integers(1, 10))
    items = [data.draw(hnp.arrays(np.float32, (data.draw(st.integers(1, 5)), dim), elements=values))
             for _ in range(data.draw(st.integers(1, 4)))]
    if precision.endswith("int8") and sum(len(m) for m in items) == 1:
        items.append(items[0] + 1)
    ours = quantize_embeddings(items, precision)
    theirs = st_quantization.quantize_embeddings(items, precision)
    assert isinstance(ours, list) and len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_identical(a, b, f"{precision} matrix {i}")


def test_quantize_refuses_what_it_cannot_do():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="single embedding"):
        quantize_embeddings(x[:1], "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize_embeddings(x, "int4")
    with pytest.raises(TypeError, match="must be floats"):
        quantize_embeddings(quantize_embeddings(x, "int8"), "int8")
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 8\)"):
        quantize_embeddings(x, "int8", ranges=np.zeros((2, 3)))


# ---------------------------------------------------------------- similarity
def reference_scores(a, b, fn, pairwise):
    enum = st_similarity.SimilarityFunction(fn)
    convert = (st_similarity.SimilarityFunction.to_similarity_pairwise_fn if pairwise
               else st_similarity.SimilarityFunction.to_similarity_fn)
    return convert(enum)(a, b)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), fn=st.sampled_from(SIMILARITY_FUNCTIONS),
       dtype=st.sampled_from([np.float32, np.float16]))
def test_similarity_equals_sentence_transformers(data, fn, dtype):
    dim = data.draw(st.integers(1, 16))
    a = data.draw(hnp.arrays(dtype, (data.draw(st.integers(1, 6)), dim), elements=st.floats(-3, 3, width=16)))
    b = data.draw(hnp.arrays(dtype, (data.draw(st.integers(1, 6)), dim), elements=st.floats(-3, 3, width=16)))
    ours, theirs = similarity(a, b, fn), reference_scores(a, b, fn, False)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, f"{ours.shape} {ours.dtype} vs {theirs.shape} {theirs.dtype}"
    diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-5), f"{fn}: max |diff| {diff}"
    b = b[:1].repeat(len(a), 0) if len(b) < len(a) else b[:len(a)]
    ours, theirs = similarity_pairwise(a, b, fn), reference_scores(a, b, fn, True)
    assert ours.shape == theirs.shape, f"{ours.shape} vs {theirs.shape}"
    diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-5), f"pairwise {fn}: max |diff| {diff}"


def test_similarity_signs_and_names():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert similarity(a, a, "euclidean")[0, 1].item() == pytest.approx(-(5 ** 0.5))
    assert similarity(a, a, "manhattan")[0, 1].item() == pytest.approx(-3.0)
    assert similarity(a[0], a, "cosine").shape == (1, 2)  # a 1-D input is one row
    with pytest.raises(ValueError, match="similarity function must be one of"):
        similarity(a, a, "jaccard")
    with pytest.raises(ValueError, match="one shape"):
        similarity_pairwise(a, a[:1], "dot")
