"""`minibge pretrain`: corpus reading, a short run end to end, its output in transformers and minibge,
and an interrupted run that resumes to exactly the weights of an uninterrupted one."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
import minibge
from minibge import BertConfig, BertModel, Tokenizer
from minibge.cli import main
from minibge.train.pretrain import pretrain
from minibge.retromae import DECODER_NAME, RetroMAEForPretraining
from minibge.train import LOG_FILE, TrainConfig

SENTENCES = ["The cells divide rapidly in unbelievably hyperactive tissues.",
             "Mitochondria are the powerhouse of the cell.",
             "Immunohistochemistry showed the protein in every sample.",
             "A short one.", "x", "Tokenization splits words into pieces."]


@pytest.fixture(scope="module")
def tiny_bert(minilm_dir, tmp_path_factory):
    """A tiny random BertModel (no MLM head) with the real MiniLM tokenizer, as a checkpoint folder."""
    torch.manual_seed(0)
    config = BertConfig(**{**TINY, "vocab_size": 30522})
    folder = tmp_path_factory.mktemp("tiny_bert")
    minibge.save_pretrained(BertModel(config), folder)
    Tokenizer.from_pretrained(minilm_dir).save_pretrained(folder)
    return folder


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES[:3]) + "\n\n   \n" + "\n".join(SENTENCES[3:]) + "\n", encoding="utf-8")
    return path


def config(**overrides):
    return TrainConfig(**{"batch_size": 2, "max_steps": 4, "lr": 1e-3, "log_steps": 1, "seed": 0, **overrides})


def test_empty_corpus_is_a_clear_error(tiny_bert, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no passages"):
        pretrain(tiny_bert, empty, tmp_path / "out", config())


def test_run_writes_a_checkpoint_transformers_and_minibge_load(tiny_bert, tmp_path):
    import transformers

    import minibge

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    metrics = pretrain(tiny_bert, data, out, config(), max_length=32)
    assert {"loss", "encoder_loss", "decoder_loss"} <= set(metrics)
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert all(entry["loss"] == pytest.approx(entry["encoder_loss"] + entry["decoder_loss"]) for entry in log)

    assert (out / DECODER_NAME).is_file() and not list(out.glob("checkpoint-*"))
    mlm, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    embedder = minibge.load_embedder(out, device="cpu")
    assert embedder.pooling == "cls" and embedder.max_length == 32
    assert embedder.encode(["a sentence"]).shape == (1, TINY["hidden_size"])
    trained = RetroMAEForPretraining.from_pretrained(out)  # continues with the trained head and decoder
    assert not torch.equal(trained.head.bias, torch.zeros_like(trained.head.bias))


@pytest.mark.slow  # three short runs
def test_interrupted_run_resumes_to_the_same_weights(tiny_bert, corpus, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    pretrain(tiny_bert, corpus, whole, config(save_steps=2))

    resumed = tmp_path / "resumed"
    forward, calls = RetroMAEForPretraining.forward, []

    def crash_on_third_step(self, **batch):
        calls.append(1)
        if len(calls) == 4:  # steps 1 and 2, the weights check before checkpoint 2, then step 3
            raise KeyboardInterrupt("simulated crash")
        return forward(self, **batch)

    monkeypatch.setattr(RetroMAEForPretraining, "forward", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_bert, corpus, resumed, config(save_steps=2))
    monkeypatch.setattr(RetroMAEForPretraining, "forward", forward)
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-2"]
    pretrain(tiny_bert, corpus, resumed, config(save_steps=2), resume=True)

    for name in ("model.safetensors", DECODER_NAME):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume (masks or dropout not replayed?)"


def test_cli_pretrain(tiny_bert, corpus, tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = ["pretrain", "-m", str(tiny_bert), "--train", str(corpus), "--out", str(out), "--batch-size", "2",
            "--max-steps", "2", "--lr", "1e-3", "--max-length", "32", "--log-steps", "1"]
    assert main(args) == 0
    assert (out / "model.safetensors").is_file() and (out / DECODER_NAME).is_file()
    assert main(args) == 1  # the folder holds a finished run now
    assert "already" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    assert main(["pretrain", "-m", str(tiny_bert), "--train", str(empty), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no passages" in err[0], err
