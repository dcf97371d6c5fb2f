"""Reranker fine-tuning (minibge/train/rerank.py, `minibge finetune-reranker`; issue 20, item 4): the listwise
loss against an independent reference, the collated groups, a run from a bare BERT and a bare XLM-R encoder
whose output reloads in transformers with the same logits, exact resume, and a 2-process torchrun run.
Models are tiny and random: a small WordPiece vocabulary (BERT) and a small Unigram one (XLM-R)."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import crash_then_resume, diff_report, logged_steps, require_module, torchrun_minibge
from rerank_fixtures import WORDS, bert_folder, shrunk, write_xlmr_tokenizer
from safetensors.torch import load_file

import minibge.train.rerank as rerank_module
from minibge import BertModel, save_pretrained
from minibge.cli import main
from minibge.losses import reranker_loss
from minibge.reranker import load_cross_encoder, load_reranker
from minibge.train.finetune import TrainExample, sample_group
from minibge.train.rerank import PairGroupCollator

# -----------------------------------------------------------------------------
# The loss

def reference_listwise(logits, group_size, teacher=None):
    """Written out with Python floats: −log(e^{z_0} / Σ_k e^{z_k}) per group, averaged; + soft-target CE."""
    values = logits.double().tolist()
    groups = [values[i:i + group_size] for i in range(0, len(values), group_size)]
    loss = 0.0
    for g, group in enumerate(groups):
        m = max(group)
        log_z = m + math.log(sum(math.exp(v - m) for v in group))
        loss += (log_z - group[0]) / len(groups)
        if teacher is not None:
            t = teacher[g].double().tolist()
            tm = max(t)
            probs = [math.exp(v - tm) for v in t]
            probs = [p / sum(probs) for p in probs]
            loss += -sum(p * (v - log_z) for p, v in zip(probs, group)) / len(groups)
    return loss


@pytest.mark.parametrize("group_size", [2, 8, 16])
def test_loss_equals_the_reference(group_size):
    gen = torch.Generator().manual_seed(group_size)
    logits = torch.randn(5 * group_size, generator=gen) * 4
    losses = reranker_loss(logits, group_size)
    assert set(losses) == {"loss", "listwise_ce"}
    assert abs(losses["loss"].item() - reference_listwise(logits, group_size)) <= 1e-5
    teacher = torch.randn(5, group_size, generator=gen)
    distilled = reranker_loss(logits, group_size, teacher)
    assert abs(distilled["loss"].item() - reference_listwise(logits, group_size, teacher)) <= 1e-5
    # the positive is column 0: moving it elsewhere changes the loss
    shuffled = logits.view(5, group_size).roll(1, dims=1).flatten()
    assert abs(reranker_loss(shuffled, group_size)["loss"].item() - losses["loss"].item()) > 1e-3


def test_loss_input_errors():
    with pytest.raises(ValueError, match=r"\(B·G,\) with G = 4"):
        reranker_loss(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="teacher_scores must be"):
        reranker_loss(torch.zeros(8), 4, torch.zeros(2, 3))


# -----------------------------------------------------------------------------
# Tiny models and data

def xlmr_folder(directory: Path) -> Path:
    """A tiny random XLM-R encoder (XLMRobertaModel layout) with a small Unigram tokenizer."""
    import dataclasses

    directory.mkdir(parents=True)
    config = dataclasses.replace(shrunk("bge-reranker-base", vocab_size=128), hidden_size=32, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=130)
    torch.manual_seed(0)
    save_pretrained(BertModel(config), directory)
    write_xlmr_tokenizer(directory)
    return directory


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def base_model(request, tmp_path_factory) -> Path:
    make = bert_folder if request.param == "bert" else xlmr_folder
    return make(tmp_path_factory.mktemp("base") / request.param)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def training_rows(n=16, n_neg=6, seed=0, scores=False):
    gen = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=gen).tolist())
    rows = []
    for i in range(n):
        topic = WORDS[i % len(WORDS)]
        row = {"query": f"{topic} {words(2)}", "pos": [f"{topic} {topic} {words(6)}"],
               "neg": [words(8) for _ in range(n_neg)]}
        if scores:
            row.update(pos_scores=[3.0], neg_scores=[float(-j) for j in range(n_neg)])
        rows.append(row)
    return rows


def rerank_args(model, train, out, *extra):
    return ["finetune-reranker", "-m", str(model), "--train", str(train), "--out", str(out), "--batch-size", "4",
            "--group-size", "4", "--lr", "1e-3", "--query-max-length", "8", "--passage-max-length", "16",
            "--max-length", "32", *extra]


# -----------------------------------------------------------------------------
# Collation

def test_collator_groups_are_the_embedders_samples_positive_first(base_model):
    reranker = load_reranker(base_model, device="cpu")
    examples = [TrainExample(r["query"], r["pos"], r["neg"], line=i) for i, r in enumerate(training_rows(3))]
    collate = PairGroupCollator(reranker, group_size=4, max_length=32, query_max_length=8, passage_max_length=16)
    batch = collate(examples, torch.Generator().manual_seed(7))
    assert batch["input_ids"].shape[0] == 12 and set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    gen = torch.Generator().manual_seed(7)
    expected = []
    for ex in examples:
        group, _ = sample_group(ex, 4, gen)  # the same generator, drawn in the same order
        expected += [(ex.query, p) for p in group]
        assert group[0] == ex.pos[0]
    ref = reranker.tokenizer.pad_pairs(reranker.tokenizer.encode_pairs(expected, 32, 8, 16))
    for name in ref:
        assert torch.equal(batch[name], ref[name]), name


def test_distillation_needs_scores(base_model, tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(8))
    assert main(rerank_args(base_model, train, tmp_path / "out", "--distill")) == 1
    assert "distillation needs pos_scores and neg_scores" in capsys.readouterr().err
    assert main(rerank_args(base_model, train, tmp_path / "out", "--group-size", "1")) == 1
    assert "group size must be at least 2" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Training runs

def test_finetune_learns_and_reloads_in_transformers(base_model, tmp_path):
    transformers = require_module("transformers")
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16, scores=True))
    out = tmp_path / "out"
    assert main(rerank_args(base_model, train, out, "--epochs", "6", "--log-steps", "1", "--distill")) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"listwise_ce", "distill"} <= set(log[0])
    first, last = sum(r["listwise_ce"] for r in log[:4]) / 4, sum(r["listwise_ce"] for r in log[-4:]) / 4
    assert last < first, f"the listwise loss did not fall: {first:.3f} → {last:.3f}"

    reranker = load_reranker(out, device="cpu")
    pairs = [(r["query"], p) for r in training_rows(4, seed=9) for p in r["pos"] + r["neg"][:2]]
    batch = reranker.tokenize(pairs, max_length=32)
    with torch.no_grad():
        ours = reranker.model(**batch)
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    kwargs = dict(batch) if hf.config.model_type == "bert" else {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = hf.eval()(**kwargs).logits
    assert (ours - ref).abs().max().item() <= 1e-4, diff_report(ours, ref)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(pairs[0][0])["input_ids"] == reranker.tokenizer.encode_batch([pairs[0][0]], 32)[0]


@pytest.mark.slow
def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path, monkeypatch):
    base = bert_folder(tmp_path / "base")
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    args = ["--epochs", "2", "--save-steps", "3"]  # 4 steps per epoch, 8 in all
    assert main(rerank_args(base, train, tmp_path / "straight", *args)) == 0
    crash_then_resume(monkeypatch, rerank_module, "reranker_loss",
                      lambda *extra: main(rerank_args(base, train, tmp_path / "crashed", *args, *extra)), tmp_path / "crashed")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "model.safetensors")
    assert set(straight) == set(resumed) and any(name.startswith("classifier.") for name in straight)
    for name in straight:
        assert torch.allclose(straight[name].float(), resumed[name].float(), atol=1e-6, rtol=0), \
            f"{name}: {diff_report(straight[name].float(), resumed[name].float())}"


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    base = xlmr_folder(tmp_path / "base")
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    out = tmp_path / "out"
    torchrun_minibge(*rerank_args(base, train, out, "--epochs", "2", "--log-steps", "1"))
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] and run["run"]["stage"] == "reranker"
    assert logged_steps(out) == [1, 2, 3, 4], "16 queries / (4 per rank × 2 ranks) = 2 steps per epoch, logged once each"
    model = load_cross_encoder(out)
    assert model.config.model_type == "xlm-roberta" and model.encoder.pooler is None
