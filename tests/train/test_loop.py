"""The shared training loop (minibge/train/loop.py): data order, schedule, checkpoint + exact resume,
output-folder rules, gradient checkpointing. Toy models keep every test well under a second."""
import json
import logging

import pytest
import torch

from minibge import BertConfig, BertModel
from minibge.fast import onednn
from minibge.train import loop as train_module
from minibge.train import Batches, TrainConfig, linear_schedule, train

from conftest import TINY, diff_report


def toy_examples(n=48):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    return list(zip(x, x @ torch.randn(4, 1, generator=gen)))


def collate(examples, generator):
    x = torch.stack([e[0] for e in examples])
    y = torch.stack([e[1] for e in examples])
    return {"x": x + 0.1 * torch.randn(x.shape, generator=generator), "y": y}  # noise from the batch's generator


def toy_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


class Interrupted(Exception):
    pass


def run(model, config, out, resume=False, stop_after_batches=None, run_info=None):
    """train() on the toy regression; stop_after_batches simulates a crash in the middle of a run."""
    seen = []

    def loss_fn(batch):
        if stop_after_batches is not None and len(seen) == stop_after_batches:
            raise Interrupted
        seen.append(batch["x"].sum().item())
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return {"loss": loss, "mse": loss.detach()}

    batches = Batches(toy_examples(), collate, config.batch_size, seed=config.seed)
    metrics = train(model, loss_fn, batches, config, out, resume=resume, run_info=run_info or {"task": "toy"})
    return metrics, seen


def test_batches_are_a_pure_function_of_epoch_and_index():
    batches = Batches(toy_examples(), collate, batch_size=8, seed=3)
    first, again = list(batches.epoch(0)), list(batches.epoch(0))
    assert len(first) == len(batches) == 6
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, again))
    resumed = list(batches.epoch(0, start=4))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first[4:], resumed))
    assert not torch.equal(first[0]["y"], next(iter(batches.epoch(1)))["y"]), "each epoch reshuffles"


def test_batches_split_each_global_batch_between_ranks(monkeypatch):
    examples = list(range(20))
    rows = {}
    for rank in range(2):
        monkeypatch.setattr(train_module, "rank_and_world", lambda rank=rank: (rank, 2))
        batches = Batches(examples, lambda ex, gen: ex, batch_size=4, seed=0)
        assert len(batches) == 2  # 20 examples // (4 × 2 ranks)
        rows[rank] = [x for batch in batches.epoch(0) for x in batch]
    assert not set(rows[0]) & set(rows[1]), "ranks must see disjoint examples"
    assert len(set(rows[0]) | set(rows[1])) == 16


def test_too_few_examples_for_one_batch():
    with pytest.raises(ValueError, match="do not fill one batch"):
        next(Batches(toy_examples(5), collate, batch_size=8).epoch(0))


def test_linear_schedule_warms_up_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = linear_schedule(optimizer, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4] == 1.0, lrs[:5]
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] == pytest.approx(1 / 16), lrs[4:]


def test_training_lowers_the_loss_and_logs(tmp_path):
    config = TrainConfig(epochs=4, batch_size=8, lr=1e-2, log_steps=3)
    metrics, _ = run(toy_model(), config, tmp_path / "out")
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert log[-1]["loss"] < log[0]["loss"] / 2, [entry["loss"] for entry in log]
    assert {"loss", "mse", "lr", "examples_per_s", "grad_norm"} <= set(metrics)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["finished"] is True


@pytest.mark.parametrize("accumulation, stop_after", [(1, 7), (2, 9), (3, 14)])
def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path, accumulation, stop_after):
    config = TrainConfig(epochs=3, batch_size=8, lr=1e-2, grad_accumulation=accumulation, save_steps=2)
    straight = toy_model()
    _, seen_straight = run(straight, config, tmp_path / "straight")

    crashed = toy_model()
    with pytest.raises(Interrupted):
        run(crashed, config, tmp_path / "crashed", stop_after_batches=stop_after)
    assert train_module.checkpoints(tmp_path / "crashed"), "the crashed run should have left a checkpoint"
    resumed = toy_model()  # a fresh process: weights come from the checkpoint, not from memory
    _, seen_resumed = run(resumed, config, tmp_path / "crashed", resume=True)

    assert seen_resumed == seen_straight[len(seen_straight) - len(seen_resumed):], "resumed on different batches"
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"{name}: {diff_report(a, b)}"
    assert not train_module.checkpoints(tmp_path / "crashed"), "checkpoints are removed after the final save"


def test_output_folder_rules(tmp_path):
    config = TrainConfig(epochs=1, batch_size=8)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(ValueError, match="not written by a minibge training run"):
            run(toy_model(), config, foreign, resume=resume)
    assert (foreign / "notes.txt").read_text() == "mine"

    with pytest.raises(Interrupted):
        run(toy_model(), TrainConfig(epochs=2, batch_size=8, save_steps=2), tmp_path / "run", stop_after_batches=3)
    with pytest.raises(ValueError, match="pass --resume"):
        run(toy_model(), config, tmp_path / "run")
    with pytest.raises(ValueError, match="different run.*config"):
        run(toy_model(), TrainConfig(epochs=2, batch_size=8, save_steps=2), tmp_path / "run", resume=True,
            run_info={"task": "toy", "config": "other"})
    # how a step is computed may change on resume, and a run recorded before `onednn` existed resumes
    interrupted = TrainConfig(epochs=2, batch_size=8, save_steps=2)
    older = {"task": "toy", "config": {k: v for k, v in vars(interrupted).items() if k != "onednn"}}
    with pytest.raises(Interrupted):
        run(toy_model(), interrupted, tmp_path / "older", run_info=older, stop_after_batches=3)
    with pytest.raises(ValueError, match="different run.*config"):  # what is computed may not change
        changed = TrainConfig(epochs=2, batch_size=8, save_steps=2, lr=1.0)
        run(toy_model(), changed, tmp_path / "older", resume=True, run_info={"task": "toy", "config": vars(changed)})
    without_onednn = TrainConfig(epochs=2, batch_size=8, save_steps=2, onednn=False)
    run(toy_model(), without_onednn, tmp_path / "older", resume=True,
        run_info={"task": "toy", "config": vars(without_onednn)})
    assert json.loads((tmp_path / "older" / "run.json").read_text())["finished"] is True
    run(toy_model(), config, tmp_path / "done")
    with pytest.raises(ValueError, match="already finished"):
        run(toy_model(), config, tmp_path / "done", resume=True)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("precision", "fp8"), ("warmup_ratio", 1.5),
                                          ("max_steps", 0), ("save_steps", -1), ("lr", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_half_precision_on_cpu_warns_and_trains_in_fp32(tmp_path, caplog):
    model = toy_model()  # fp16 here; bf16 on the CPU: tests/train/test_precision.py
    run(model, TrainConfig(epochs=1, batch_size=8, precision="fp16"), tmp_path / "out")
    assert "needs CUDA" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    config = BertConfig(**{**TINY, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    torch.manual_seed(0)
    plain = BertModel(config).train()
    wrapped = BertModel(config).train()
    wrapped.load_state_dict(plain.state_dict())
    assert plain.gradient_checkpointing is False, "off unless asked for"
    wrapped.gradient_checkpointing = True
    ids = torch.randint(1, config.vocab_size, (3, 10))
    for model in (plain, wrapped):
        torch.manual_seed(7)  # same dropout masks; checkpointing must replay them in the recomputation
        model(ids).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), f"{name}: {diff_report(a.grad, b.grad)}"
    with pytest.raises(ValueError, match="no EncoderLayer"):
        run(toy_model(), TrainConfig(epochs=1, batch_size=8, gradient_checkpointing=True), tmp_path / "out")
    assert not (tmp_path / "out").exists(), "refused before the output folder is touched"


def test_gradient_checkpointing_leaves_the_fast_path_open(tmp_path):
    # the flag is data, not a patched forward: after training with it, encode() takes the fast path
    from minibge import Embedder, Tokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", ","]) + "\n")
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    embedder = Embedder(model, Tokenizer.from_pretrained(tmp_path), max_length=16)
    texts = ["a short text", "another, somewhat longer text to embed"]
    batch = embedder.tokenize(texts, 16)

    def loss_fn(batch):
        return {"loss": embedder.embed(batch).square().sum()}

    seen = []

    def checkpointing_loss(batch):
        seen.append(model.gradient_checkpointing)
        return loss_fn(batch)

    batches = Batches([batch] * 4, lambda examples, generator: examples[0], batch_size=1)
    train(model, checkpointing_loss, batches, TrainConfig(max_steps=2, batch_size=1, gradient_checkpointing=True),
          tmp_path / "out")
    assert seen == [True, True, True], "set for the length of the loop (two steps and the check before saving)"
    assert model.gradient_checkpointing is False, "and back as it was afterwards"
    embedder.encode(texts)
    assert embedder.fast_path_blocker() is None
    model.gradient_checkpointing = True  # set by hand, in eval mode: still the fast path
    embedder.encode(texts)
    assert embedder.fast_path_blocker() is None


# -----------------------------------------------------------------------------
# oneDNN Linears (minibge/onednn.py) for the length of the loop

def linear_types(model):
    return {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("enabled", [True, False])
def test_linears_run_on_onednn_only_while_training(tmp_path, caplog, enabled):
    model, during = toy_model(), []

    def loss_fn(batch):
        during.append(linear_types(model))
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return {"loss": loss}

    config = TrainConfig(epochs=1, batch_size=8, onednn=enabled)
    with caplog.at_level(logging.INFO, logger="minibge.train"):
        train(model, loss_fn, Batches(toy_examples(), collate, 8), config, tmp_path / "out")
    on_onednn = enabled and onednn.available(model[0].weight)
    assert during == [{onednn.Linear if on_onednn else torch.nn.Linear}] * (6 + 1)  # + the check before saving
    assert linear_types(model) == {torch.nn.Linear}, "the caller gets its model back with plain nn.Linears"
    assert caplog.text.count("compute through oneDNN") == on_onednn, "logged once when on, never when off"


def test_a_crash_restores_plain_linears_and_checkpoints_keep_their_keys(tmp_path):
    model = toy_model()
    keys = list(model.state_dict())
    with pytest.raises(Interrupted):
        run(model, TrainConfig(epochs=2, batch_size=8, save_steps=2), tmp_path / "run", stop_after_batches=5)
    assert linear_types(model) == {torch.nn.Linear}
    state = torch.load(train_module.checkpoints(tmp_path / "run")[-1] / train_module.STATE_FILE, weights_only=True)
    assert list(state["model"]) == keys, "a checkpoint written on oneDNN Linears has the plain model's keys"


def test_onednn_option_must_be_a_bool():
    with pytest.raises(TypeError, match="onednn"):
        TrainConfig(onednn="no")
