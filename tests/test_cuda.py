"""The same contracts on a CUDA device, at the precisions people run there. Skipped without a GPU.

The development machines have none; run this file whenever one is at hand:
    python -m pytest -q tests/test_cuda.py
On CUDA, SDPA dispatches to the Flash / memory-efficient kernels, and fp16/bf16 change every rounding,
so "equal to transformers" becomes "as close to fp32 as transformers itself gets".
"""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import gradient_errors, hf_reference_model, official_state_dict, random_batch, training_pair

import minibge
from minibge import BertModel
from minibge.embedder import Embedder
from minibge.tokenizer import Tokenizer
from minibge.weights import load_state_into

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def paired(name="bge-small-en-v1.5", dtype=torch.float32, **overrides):
    config = dataclasses.replace(minibge.preset(name), **overrides)
    hf_model = hf_reference_model(config, seed=1)
    model = BertModel(config)
    load_state_into(model, official_state_dict(hf_model))
    return model.to(CUDA, dtype).eval(), hf_model.to(CUDA, dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_as_close_to_fp32_as_transformers(dtype):
    model32, hf32 = paired()
    model_half, hf_half = paired(dtype=dtype)
    ids, mask, types = (t.to(CUDA) for t in random_batch(model32.config, 8, 128, seed=3))
    real = mask.bool()
    with torch.no_grad():
        reference = model32(ids, mask, types)[real].double()
        ours = (model_half(ids, mask, types)[real].double() - reference).abs().max().item()
        theirs = (hf_half(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state[real].double()
                  - reference).abs().max().item()
    assert ours <= 3 * theirs + 1e-6, f"{dtype}: minibge max |diff| to fp32 {ours:.3e}, transformers {theirs:.3e}"


def test_gradients_match_transformers_on_cuda():
    config = dataclasses.replace(minibge.preset("bge-small-en-v1.5"), hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model, hf_model = training_pair(config)
    model, hf_model = model.to(CUDA), hf_model.to(CUDA)
    batch = [t.to(CUDA) for t in random_batch(config, 4, 64, seed=5)]
    for attn_impl in ("sdpa", "manual"):
        model.set_attn_impl(attn_impl)
        errors = gradient_errors(model, hf_model, *batch)
        worst = max(errors, key=errors.get)
        # TF32 may be on for matmuls; both sides use the same kernels for sdpa, not for manual
        assert errors[worst] <= 1e-3, f"{attn_impl}: worst relative gradient error {errors[worst]:.3e} in {worst}"


def tiny_tokenizer(tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "##s", "##ing"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + list("abcdefghijklmnopqrstuvwxyz.,!?")
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_embedder_half_precision_on_cuda(tmp_path, dtype):
    model32, _ = paired(vocab_size=64)
    model_half, _ = paired(vocab_size=64)
    tokenizer = tiny_tokenizer(tmp_path)
    texts = ["the cat sat on the mat", "a dog ran far away", "cats", "the " * 100]
    full = Embedder(model32, tokenizer).encode(texts)
    half_embedder = Embedder(model_half.to(getattr(torch, dtype)), tokenizer)
    half = half_embedder.encode(texts)
    assert half.dtype == np.float32 and half.shape == full.shape
    cosine = (half * full).sum(1)
    assert cosine.min() >= 0.999, f"{dtype}: min cosine to fp32 {cosine.min():.6f}"
    emb = half_embedder.embed(texts[:2])  # the gradient-carrying path runs in the model's dtype
    assert emb.dtype == getattr(torch, dtype) and emb.requires_grad


def test_encode_after_moving_to_cuda_takes_the_gpu_attention_mode(minilm_dir):
    embedder = minibge.load_embedder(minilm_dir, device="cpu")
    texts = ["A man is playing a guitar.", "Giant pandas eat bamboo.", "x"]
    on_cpu = embedder.encode(texts)
    assert embedder.fast_encoder.attention == "buckets"
    embedder.model.to(CUDA)
    on_gpu = embedder.encode(texts)
    assert embedder.fast_encoder.attention == "padded" and embedder.fast_encoder.device_type == "cuda"
    assert np.abs(on_gpu - on_cpu).max() < 1e-4, f"max |diff| {np.abs(on_gpu - on_cpu).max():.2e}"
