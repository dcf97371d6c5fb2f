"""The benchmarks run end to end (tiny shapes, CPU) and report what they should.

Timings are never asserted: only that every section ran and that the numbers it reports are
the ones the equivalence checks promise.
"""
import json

import numpy as np
import pytest
import torch
from conftest import TINY, require_module

from minibge import BertConfig, BertModel, Embedder, load_embedder
from minibge.bench import gpu as bench_gpu
from minibge.bench import train as bench_train
from minibge.fast import onednn
from minibge.bench.run import Workload, build_peers, markdown, run_rounds, summarise
from minibge.model import encoder_flops
from minibge.bench.peers import all_peers


def test_gpu_script_smoke_runs_every_section(tmp_path):
    require_module("transformers")  # the script runs without it, but then there is nothing to compare
    status = bench_gpu.main(["--out", str(tmp_path), "--smoke"])
    results = json.loads((tmp_path / "results.json").read_text())
    errors = "\n".join(e["traceback"] for e in results["errors"])
    assert status == 0 and not errors, f"sections failed:\n{errors}"
    failed = [r for section in ("equivalence", "throughput") for r in results[section]
              if "failed" in r.get("note", "")]
    assert not failed, f"implementations failed: {failed}"
    impls = {r["impl"] for r in results["throughput"]}
    assert {"minibge sdpa", "minibge unpadded/buckets", "transformers sdpa"} <= impls, impls
    low_precision = [r for r in results["equivalence"] if "ratio_to_transformers" in r]
    assert low_precision and all(r["within_3x"] for r in low_precision), \
        [(r["impl"], r["dtype"], r["ratio_to_transformers"]) for r in low_precision]
    fp32 = [r for r in results["equivalence"] if r["impl"] == "minibge vs transformers"]
    assert fp32 and fp32[0]["max_abs_diff"] < 1e-4, fp32
    assert "## Throughput" in (tmp_path / "results.md").read_text()


# -----------------------------------------------------------------------------
# minibge bench (CPU): the machinery on a tiny checkpoint, a handful of texts

TEXTS = ["A man is playing a guitar.", "A woman slices an onion.", "how do giant pandas eat bamboo?",
         "x", "Stocks fell sharply on Monday after the report. " * 12, "The cat sat on the mat."]


@pytest.fixture(scope="module")
def tiny_folder(minilm_dir, tmp_path_factory):
    """A tiny random BERT with the real uncased tokenizer, saved as a complete embedder folder."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**TINY, "vocab_size": 30522, "max_position_embeddings": 512})).eval()
    tokenizer = load_embedder(minilm_dir, device="cpu").tokenizer
    return Embedder(model, tokenizer, pooling="cls", max_length=64).save_pretrained(tmp_path_factory.mktemp("tiny"))


def run_peers(folder, names, rounds=2):
    require_module("transformers")
    require_module("sentence_transformers")
    embedder = load_embedder(folder, device="cpu")
    workloads = [Workload("pairs", TEXTS, (TEXTS[:3], TEXTS[3:], [1.0, 3.0, 2.0])), Workload("docs", TEXTS[::-1])]
    peers = [p for p in all_peers() if p.name in names]
    assert len(peers) == len(names), [p.name for p in peers]
    build_peers(peers, folder, embedder, workloads)
    run_rounds(peers, workloads, rounds)
    return summarise("tiny", embedder, peers, workloads)


def test_bench_rows_agree_and_report(tiny_folder):
    names = ["sentence-transformers encode", "minibge encode (default: fast path)", "minibge plain path (sdpa)",
             "minibge plain path (manual)", "transformers BertModel SDPA, FlagEmbedding loop"]
    rows = run_peers(tiny_folder, names)
    skipped = [r for r in rows if "skipped" in r]
    assert not skipped, skipped
    assert len(rows) == 2 * len(names)
    for r in rows:
        assert r["rounds"] == 2 and r["median_s"] > 0 and r["texts_per_s"] > 0, r
        # every peer computes the same vectors: float rounding apart
        assert r["max_one_minus_cos"] < 1e-5, (r["peer"], r["workload"], r["max_one_minus_cos"])
    pairs = [r for r in rows if r["workload"] == "pairs"]
    assert all(r["stsb_spearman"] is not None for r in pairs)
    assert len({round(r["stsb_spearman"], 6) for r in pairs}) == 1, [r["stsb_spearman"] for r in pairs]
    report = markdown({"machine": {"date": "d", "cores": 2, "cpu": "c", "cpu_flags": [], "torch": "t",
                                   "torch_cpu_capability": "x", "threads": 1, "load_average": None},
                       "peak_gflops": 100.0, "rows": rows, "kernels": {"tiny": "attention route: buckets (...)"}},
                      "minibge bench")
    for name in names:
        assert name in report
    assert "Kernels the default encode chose for tiny: attention route: buckets (...)." in report


def test_training_step_rows(tiny_folder, monkeypatch):
    require_module("transformers")
    # the bf16 row is only built where the CPU has native bf16; autocast runs (emulated) anywhere, so test it here
    monkeypatch.setattr(bench_train, "cpu_has_native_bf16", lambda: True)
    calls = []

    def counting_linear(*args, **kwargs):
        calls.append(1)
        return plain_linear(*args, **kwargs)

    plain_linear = onednn.linear
    monkeypatch.setattr(onednn, "linear", counting_linear)
    rows = bench_train.train_step_benchmark(tiny_folder, TEXTS[:3], TEXTS[3:], steps=1)
    assert [r["step"] for r in rows] == ["minibge BertModel", "minibge BertModel, MKL (no oneDNN)",
                                         "minibge BertModel, bf16 autocast",
                                         "transformers BertModel (SDPA)"]
    assert all(r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in rows) and rows[-1]["vs_transformers"] == 1.0
    assert bool(calls) == onednn.available(torch.zeros(1)), "the minibge row trains on oneDNN, as finetune does"
    assert "| minibge BertModel, MKL (no oneDNN) |" in bench_train.markdown(rows, "tiny")


def test_gradient_caching_rows(tiny_folder):
    rows = bench_train.cached_step_benchmark(tiny_folder, TEXTS[:3], TEXTS[3:], batches=(2, 16), chunk_size=4,
                                             plain_max_batch=2)
    assert [(r["queries"], r["step"]) for r in rows] == [(2, "plain"), (2, "cached (chunk 4)"),
                                                         (16, "plain"), (16, "cached (chunk 4)")]
    assert "skipped" in rows[2] and all(r["tokens_per_s"] > 0 for r in rows if "skipped" not in r)
    cached_2, cached_16 = rows[1]["activations_mb"], rows[3]["activations_mb"]
    assert cached_16 <= 1.5 * cached_2, f"chunked activations grew: {cached_2:.2f} → {cached_16:.2f} MB"
    assert cached_2 < rows[0]["activations_mb"], "2 queries × 4 passages in chunks of 4 hold less than all 10 at once"
    report = bench_train.cached_markdown(rows, "tiny")
    assert "| 16 (64) | plain |" in report and "not run" in report


@pytest.mark.slow
def test_onnx_runtime_peers_agree(tiny_folder):
    require_module("onnxruntime")
    require_module("onnx")
    rows = run_peers(tiny_folder, ["sentence-transformers encode", "minibge plain path (sdpa)",
                                   "ONNX Runtime, no graph optimizer", "ONNX Runtime + BERT optimizer"], rounds=1)
    assert not [r for r in rows if "skipped" in r], rows
    assert max(r["max_one_minus_cos"] for r in rows) < 1e-5, [(r["peer"], r["max_one_minus_cos"]) for r in rows]


@pytest.mark.slow
def test_onnx_runtime_int8_peer_is_close_not_equal(tiny_folder):
    require_module("onnxruntime")
    require_module("onnx")
    rows = run_peers(tiny_folder, ["minibge plain path (sdpa)", "ONNX Runtime int8 (dynamic quantisation)"], rounds=1)
    assert not [r for r in rows if "skipped" in r], rows
    int8 = [r["max_one_minus_cos"] for r in rows if "int8" in r["peer"]]
    assert int8 and all(0 < c < 0.5 for c in int8), int8  # quantised: close, visibly not exact


def test_encoder_flops_counts_real_tokens():
    config = BertConfig(**TINY)
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    one = L * (2 * 10 * (4 * H * H + 2 * H * I) + 4 * 10 * 10 * H)
    assert encoder_flops(config, [10]) == one
    assert encoder_flops(config, [10, 10]) == 2 * one  # no padding term: a batch costs its texts
    assert np.isclose(encoder_flops(config, [5]) * 2, encoder_flops(config, [10]) - 4 * L * 50 * H)
