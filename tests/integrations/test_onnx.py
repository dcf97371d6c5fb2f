"""ONNX export (minibge/integrations/onnx.py, `minibge export`): ONNX Runtime gives encode()'s vectors
(cosine >= 0.99999) with dynamic batch and length, on the real all-MiniLM-L6-v2 (mean pooling) and a
synthetic BGE (CLS pooling); a failed export leaves nothing behind."""
import contextlib
import io

import numpy as np
import pytest
import torch

import minibge
from conftest import require_module
from minibge.cli import main
from minibge.evaluate.data import load_sts_csv

require_module("onnxruntime")
require_module("onnx")
from minibge.integrations import onnx as onnx_export  # noqa: E402


def cosines(a, b):
    return (a * b).sum(axis=1)


@pytest.mark.slow  # exports and checks a 90 MB graph: ~15 s
def test_cli_export_of_minilm_matches_encode(minilm_dir, shared_data, tmp_path):
    torch.set_num_threads(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["export", "-m", str(minilm_dir), "--onnx", str(tmp_path / "minilm.onnx")])
    assert code == 0 and "wrote" in out.getvalue()
    embedder = minibge.load_embedder(minilm_dir, device="cpu")
    s1, s2, _ = load_sts_csv(shared_data / "stsbenchmark" / "sts-test.csv")
    texts = s1[:48] + s2[:16] + [" ".join(s1[:60])]  # the last one is cut at 256 tokens
    reference = embedder.encode(texts)
    for batch in (texts[:1], texts[5:6], texts):  # batch 1 and 65, lengths 5 to 256 tokens
        ours = onnx_export.run_onnx(tmp_path / "minilm.onnx", embedder, batch)
        expected = reference[[texts.index(t) for t in batch]]
        cos = cosines(ours, expected)
        assert cos.min() >= 0.99999, f"min cosine {cos.min()}, max |diff| {np.abs(ours - expected).max():.2e}"


def test_export_cls_pooling_and_failure_leaves_nothing(fake_bge, tmp_path, monkeypatch):
    embedder = minibge.load_embedder(fake_bge(), device="cpu")
    assert embedder.pooling == "cls"
    path = onnx_export.export_onnx(embedder, tmp_path / "bge.onnx")
    texts = ["short", "a longer text with a few more words than the first", "mid length text"]
    cos = cosines(onnx_export.run_onnx(path, embedder, texts), embedder.encode(texts))
    assert cos.min() >= 0.99999, f"min cosine {cos.min()}"
    before = path.read_bytes()

    def wrong(*args, **kwargs):
        raise ValueError("disagrees with encode()")

    monkeypatch.setattr(onnx_export, "check_onnx", wrong)
    with pytest.raises(ValueError, match="disagrees"):
        onnx_export.export_onnx(embedder, path)
    assert path.read_bytes() == before, "a failed export replaced the existing file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bge-small-en-v1.5", "bge.onnx"], "partial file left"


def test_check_catches_a_wrong_graph(fake_bge, tmp_path):
    embedder = minibge.load_embedder(fake_bge(), device="cpu")
    path = onnx_export.export_onnx(embedder, tmp_path / "bge.onnx")
    embedder.pooling = "mean"  # the graph pools CLS: the check must see the difference
    with pytest.raises(ValueError, match="min cosine"):
        onnx_export.check_onnx(path, embedder)
