"""Mixed precision in the training loop on the CPU (minibge/train/loop.py): bf16 autocast where the CPU
multiplies bf16 in hardware, refused where it would be emulated, fp16 warned back to fp32.

bf16 autocast itself works on any x86 CPU (emulated where there is no hardware), so the tests that
train in bf16 pretend the CPU has it (cpu_has_native_bf16 → True) and run everywhere."""
import json
import logging
import math

import pytest
import torch

import minibge.train.loop as loop_module
from minibge import BertConfig, BertModel, Embedder, Tokenizer
from minibge.cli import main
from minibge.fast import onednn
from minibge.train import Batches, TrainConfig, train
from minibge.train.finetune import ContrastiveStep

from conftest import TINY

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_embedder(folder, seed=0) -> Embedder:
    """A tiny random BERT without dropout (so fp32 and bf16 see the same function), mean pooling."""
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    return Embedder(BertModel(config), Tokenizer.from_pretrained(folder), pooling="mean", max_length=64)


def tokens(n, length, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


BATCH = {"query": tokens(16, 12, 0), "passages": tokens(32, 24, 1)}  # 16 queries, groups of 2


class RecordingStep(ContrastiveStep):
    """finetune's loss, noting for every forward whether autocast was on and which Linear class ran."""

    def __init__(self, embedder):
        super().__init__(embedder, temperature=0.05)
        self.seen = []

    def embed(self, rows):
        linears = {type(m) for m in self.embedder.model.modules() if isinstance(m, torch.nn.Linear)}
        self.seen.append((torch.is_autocast_enabled("cpu"), linears))
        return super().embed(rows)


def train_once(folder, precision, steps=1, cache_chunk_size=None):
    """`steps` optimizer steps on BATCH; (the embedder, its step, the first step's loss: before any update)."""
    embedder = tiny_embedder(folder)
    step = RecordingStep(embedder)
    batches = Batches([BATCH] * steps, lambda examples, generator: examples[0], batch_size=1)
    config = TrainConfig(max_steps=steps, batch_size=1, lr=1e-3, precision=precision, log_steps=1,
                         cache_chunk_size=cache_chunk_size)
    train(embedder.model, step, batches, config, folder / "out")
    first = json.loads((folder / "out" / loop_module.LOG_FILE).read_text().splitlines()[0])
    return embedder, step, first["loss"]


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr("minibge.common.cpu_has_native_bf16", lambda: True)


def test_bf16_step_on_cpu_matches_fp32_and_keeps_fp32_weights(tmp_path, native_bf16, caplog):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, fp32_step, fp32_loss = train_once(tmp_path / "a", "fp32")
    with caplog.at_level(logging.INFO, logger="minibge.train"):
        embedder, bf16_step, bf16_loss = train_once(tmp_path / "b", "bf16", steps=2)
    diff = abs(bf16_loss - fp32_loss)
    # same weights, same batch, no dropout: only the rounding differs (measured: 7.6e-4 relative)
    assert diff < 5e-3 * abs(fp32_loss), f"bf16 loss {bf16_loss:.5f} vs fp32 {fp32_loss:.5f}: |diff| {diff:.2e}"
    assert bf16_loss != fp32_loss, "bf16 autocast changed nothing: the step did not run in bf16"
    assert all(autocast for autocast, _ in bf16_step.seen), "every forward (steps and the check) under autocast"
    assert not any(autocast for autocast, _ in fp32_step.seen)
    assert {frozenset(linears) for _, linears in bf16_step.seen} == {frozenset({torch.nn.Linear})}, \
        "under bf16 autocast the Linears stay F.linear (autocast does not cast inside oneDNN's custom function)"
    if onednn.available(torch.zeros(1)):
        assert {frozenset(linears) for _, linears in fp32_step.seen} == {frozenset({onednn.Linear})}
    wrong = [(name, p.dtype) for name, p in embedder.model.named_parameters() if p.dtype != torch.float32]
    assert not wrong, f"master weights must stay fp32: {wrong}"
    reference = tiny_embedder(tmp_path / "a").model.state_dict()
    changed = max(float((p - reference[name]).abs().max()) for name, p in embedder.model.state_dict().items())
    assert changed > 1e-4, f"two bf16 steps at lr 1e-3 moved no weight (max |change| {changed:.2e})"
    assert "bf16 autocast on the CPU" in caplog.text


def test_bf16_with_gradient_caching_takes_the_loops_autocast(tmp_path, native_bf16):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, plain_step, plain_loss = train_once(tmp_path / "a", "bf16")
    _, cached_step, cached_loss = train_once(tmp_path / "b", "bf16", cache_chunk_size=5)
    assert len(cached_step.seen) > len(plain_step.seen) and all(autocast for autocast, _ in cached_step.seen), \
        "every chunk's forward, in steps 1 and 3 of the cached step, runs under the loop's autocast"
    diff = abs(cached_loss - plain_loss)
    assert diff < 1e-3 * abs(plain_loss), f"cached {cached_loss:.5f} vs plain {plain_loss:.5f}: |diff| {diff:.2e}"


def test_bf16_is_refused_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr("minibge.common.cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="bf16 on this CPU would be emulated"):
        train_once(tmp_path, "bf16")
    assert not (tmp_path / "out").exists(), "refused before the output folder is touched"


def test_cli_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("minibge.common.cpu_has_native_bf16", lambda: False)
    folder = tmp_path / "model"
    folder.mkdir()
    tiny_embedder(folder).save_pretrained(folder)
    train_file = tmp_path / "t.jsonl"
    train_file.write_text("".join(json.dumps({"query": f"q {c}", "pos": [f"p {c}"]}) + "\n" for c in LETTERS[:8]))
    args = ["finetune", "-m", str(folder), "--train", str(train_file), "--out", str(tmp_path / "out"),
            "--batch-size", "4", "--group-size", "1", "--precision", "bf16"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minibge: error: precision bf16 on this CPU"), err


def test_fp16_on_cpu_warns_and_trains_in_fp32(tmp_path, caplog):
    embedder, step, _ = train_once(tmp_path, "fp16")
    assert "fp16 needs CUDA" in caplog.text
    assert not any(autocast for autocast, _ in step.seen)
    assert all(p.dtype == torch.float32 for p in embedder.model.parameters())



@pytest.mark.slow  # four commands on tiny models (~1 min under load)
@pytest.mark.parametrize("command", ["finetune-reranker", "finetune-m3", "pretrain", "finetune"])
def test_every_command_on_the_loop_trains_in_bf16(tmp_path, native_bf16, command, monkeypatch):
    """The loop is shared, so each command gets bf16 for free: under autocast every loss (listwise CE,
    M3's unified loss, RetroMAE's MLM, InfoNCE with gradient caching) runs, is finite and is logged."""
    from test_train_rerank import training_rows, write_jsonl, xlmr_folder

    seen = []
    real_autocast = loop_module._autocast

    def recording_autocast(device, precision):
        seen.append(precision)
        return real_autocast(device, precision)

    monkeypatch.setattr(loop_module, "_autocast", recording_autocast)
    base = xlmr_folder(tmp_path / "base")
    rows = training_rows(8)
    train_file = write_jsonl(tmp_path / "t.jsonl", rows)
    if command == "pretrain":  # RetroMAE reads plain text, one passage a line
        train_file = tmp_path / "corpus.txt"
        train_file.write_text("".join(row["pos"][0] + "\n" for row in rows))
    out = tmp_path / "out"
    args = [command, "-m", str(base), "--train", str(train_file), "--out", str(out), "--batch-size", "4",
            "--max-steps", "2", "--log-steps", "1", "--lr", "1e-3", "--precision", "bf16"]
    if command != "pretrain":
        args += ["--group-size", "4", "--query-max-length", "8", "--passage-max-length", "16"]
    if command == "finetune":
        args += ["--cache-chunk-size", "3"]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / loop_module.LOG_FILE).read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(entry["loss"]) for entry in log), log
    assert seen and set(seen) == {"bf16"}, f"{command}: every forward through the loop's bf16 autocast ({seen})"
