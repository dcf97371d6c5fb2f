"""BGE-M3's unified fine-tuning (losses.m3_loss, minibge/train/m3.py, `minibge finetune-m3`; issue 21, item 5):
the unified loss against an independent reference on fixed scores (the three InfoNCE losses, the ensemble
teacher, the distillation terms), a run from a bare XLM-R encoder that gets fresh heads and writes an official
M3 folder, exact resume (the heads included), and a 2-process torchrun run."""
import json
import math

import pytest
import torch
from conftest import crash_then_resume, diff_report, logged_steps, torchrun_minibge
from safetensors.torch import load_file
from test_train_rerank import training_rows, write_jsonl, xlmr_folder

import minibge.train.m3 as m3_module
from minibge.cli import main
from minibge.losses import m3_loss
from minibge.m3 import HEAD_FILES, load_m3


def reference_unified(dense, sparse, colbert, G, w=(1.0, 0.3, 1.0), lam=(1.0, 0.1, 1.0), self_distill=True):
    """Written from the formulas, row by row, with plain math on Python floats."""
    B = len(dense)

    def info_nce(s):  # −1/B Σ_i log softmax(s_i)[i·G]
        return sum(-(s[i][i * G] - math.log(sum(math.exp(x) for x in s[i]))) for i in range(B)) / B

    def kd(s, t):  # −1/B Σ_i Σ_j softmax(t_i)_j · log softmax(s_i)_j
        total = 0.0
        for i in range(B):
            zt = sum(math.exp(x) for x in t[i])
            zs = math.log(sum(math.exp(x) for x in s[i]))
            total -= sum(math.exp(t[i][j]) / zt * (s[i][j] - zs) for j in range(len(s[i])))
        return total / B

    inter = [[w[0] * d + w[1] * s + w[2] * c for d, s, c in zip(*rows)] for rows in zip(dense, sparse, colbert)]
    parts = {"dense": info_nce(dense), "sparse": info_nce(sparse), "colbert": info_nce(colbert), "ensemble": info_nce(inter)}
    loss = (lam[0] * parts["dense"] + lam[1] * parts["sparse"] + lam[2] * parts["colbert"] + parts["ensemble"]) / 4
    if self_distill:
        parts["distill"] = (lam[0] * kd(dense, inter) + lam[1] * kd(sparse, inter) + lam[2] * kd(colbert, inter)) / 3
        loss = (loss + parts["distill"]) / 2
    parts["loss"] = loss
    return parts


@pytest.mark.parametrize("B,G", [(1, 2), (3, 4), (4, 8)])
@pytest.mark.parametrize("self_distill", [True, False])
def test_unified_loss_equals_the_reference(B, G, self_distill):
    gen = torch.Generator().manual_seed(B * 10 + G)
    dense, colbert = (torch.randn(B, B * G, generator=gen, dtype=torch.float64) * 5 for _ in range(2))
    sparse = torch.rand(B, B * G, generator=gen, dtype=torch.float64) * 20
    ours = m3_loss(dense, sparse, colbert, G, self_distill=self_distill)
    ref = reference_unified(dense.tolist(), sparse.tolist(), colbert.tolist(), G, self_distill=self_distill)
    assert set(ours) == set(ref)
    for name in ref:
        assert abs(ours[name].item() - ref[name]) <= 1e-9, f"{name}: {ours[name].item()} vs {ref[name]}"


def test_teacher_gets_no_gradient_and_custom_weights():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(2, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ours = m3_loss(*scores, 3, teacher_weights=(0.5, 1.0, 2.0), loss_weights=(1.0, 0.5, 0.2))
    ref = reference_unified(*(s.tolist() for s in scores), 3, w=(0.5, 1.0, 2.0), lam=(1.0, 0.5, 0.2))
    assert abs(ours["loss"].item() - ref["loss"]) <= 1e-9
    # the distillation target is held constant: d(distill)/d(scores) is that of a fixed-target cross-entropy
    dense = scores[0]
    target = (0.5 * scores[0] + 1.0 * scores[1] + 2.0 * scores[2]).detach().softmax(-1)
    grad, = torch.autograd.grad(ours["distill"], dense)
    expected = (dense.softmax(-1) - target) / 2 / 3  # ∂/∂s of the mean over B = 2 rows, λ1 = 1, then / 3
    assert torch.allclose(grad, expected, atol=1e-12), diff_report(grad, expected)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, B·G\)"):
        m3_loss(torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 5), 3)
    with pytest.raises(ValueError, match="G = 4"):
        m3_loss(torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 6), 4)


def m3_args(model, train, out, *extra):
    return ["finetune-m3", "-m", str(model), "--train", str(train), "--out", str(out), "--batch-size", "4",
            "--group-size", "4", "--lr", "1e-3", "--query-max-length", "8", "--passage-max-length", "16", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return xlmr_folder(tmp_path_factory.mktemp("m3base") / "xlmr")


def test_finetune_from_a_bare_encoder_writes_an_m3_folder(base, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    out = tmp_path / "out"
    assert not any((base / f).exists() for f in HEAD_FILES.values())
    assert main(m3_args(base, train, out, "--epochs", "4", "--log-steps", "1")) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"dense", "sparse", "colbert", "ensemble", "distill"} <= set(log[0])
    assert log[-1]["loss"] < log[0]["loss"], f"the loss did not fall: {log[0]['loss']} → {log[-1]['loss']}"
    assert all((out / f).exists() for f in HEAD_FILES.values())
    m3 = load_m3(out, device="cpu")
    res = m3.encode(["cat dog", "tree car road"], return_sparse=True, return_colbert_vecs=True)
    assert res["dense_vecs"].shape == (2, 32) and res["colbert_vecs"][0].shape[1] == 32
    base_m3 = load_m3(base, device="cpu")
    with pytest.raises(ValueError, match="no colbert_linear.pt"):
        base_m3.encode(["x"], return_colbert_vecs=True)


def m3_weights(folder) -> dict:
    """Every tensor of an M3 folder: the encoder's, and each head's under its file's name."""
    weights = dict(load_file(folder / "model.safetensors"))
    for name, filename in HEAD_FILES.items():
        for key, value in torch.load(folder / filename, weights_only=True).items():
            weights[f"{filename}:{key}"] = value
    return weights


@pytest.mark.slow  # three short trainings (~20 s of CPU), as the other resume tests
def test_resume_after_a_crash_ends_with_the_same_weights(base, tmp_path, monkeypatch):
    """Interrupted after checkpoint 3 and resumed with --resume, a run from a bare encoder (fresh heads) ends
    with the uninterrupted run's weights, both heads included: the heads are restored, not made fresh again."""
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    args = ["--epochs", "2", "--save-steps", "3", "--log-steps", "1"]  # 4 steps per epoch, 8 in all
    assert main(m3_args(base, train, tmp_path / "straight", *args)) == 0
    crash_then_resume(monkeypatch, m3_module, "m3_loss",
                      lambda *extra: main(m3_args(base, train, tmp_path / "crashed", *args, *extra)), tmp_path / "crashed")
    assert logged_steps(tmp_path / "crashed") == list(range(1, 9)), "the log has each step once"

    straight, resumed = m3_weights(tmp_path / "straight"), m3_weights(tmp_path / "crashed")
    assert set(straight) == set(resumed) and sum(":" in name for name in straight) == 4, sorted(straight)
    for name in straight:
        assert torch.allclose(straight[name].float(), resumed[name].float(), atol=1e-6, rtol=0), \
            f"{name}: {diff_report(straight[name].float(), resumed[name].float())}"


@pytest.mark.slow
def test_torchrun_two_processes(base, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    out = tmp_path / "out"
    torchrun_minibge(*m3_args(base, train, out, "--epochs", "2", "--log-steps", "1"))
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] and run["run"]["stage"] == "m3"
    assert logged_steps(out) == [1, 2, 3, 4], "16 queries / (4 per rank × 2 ranks) = 2 steps per epoch, logged once each"
    m3 = load_m3(out, device="cpu")
    assert m3.model.colbert_linear is not None and m3.model.sparse_linear is not None
