"""Contrastive fine-tuning and hard-negative mining: data, sampling, the CLI's bad-input handling,
exact resume, the output folder's loadability, and torchrun. Models are tiny and random, with a
small WordPiece vocabulary written by the test, so nothing here needs real weights."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minibge.train.finetune as finetune_module
from minibge import BertConfig, BertModel, Embedder, load_embedder
from minibge.cli import main
from minibge.train.finetune import DataError, GroupCollator, TrainExample, read_train_file, sample_group
from minibge.train.mine import mine_hard_negatives
from minibge.tokenizer import Tokenizer

from conftest import TINY, diff_report, logged_steps, require_module, torchrun_minibge

WORDS = ("cat dog fish bird tree car road house river city blue red green small big old new fast slow "
         "paper model query answer protein cell gene drug trial").split()
INSTRUCTION = "find: "


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny random encoder saved as a complete embedder folder with *mean* pooling and an instruction."""
    folder = tmp_path_factory.mktemp("base")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), ":", ".", ","]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY))
    embedder = Embedder(model, Tokenizer.from_pretrained(folder), pooling="mean", max_length=48,
                        query_instruction=INSTRUCTION, name="tiny")
    return embedder.save_pretrained(folder)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def training_rows(n=24, n_neg=5, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=gen).tolist())
    return [{"query": f"q{i} " + words(3), "pos": [words(8)], "neg": [words(8) for _ in range(n_neg)]} for i in range(n)]


def finetune_args(model, train, out, *extra):
    return ["finetune", "-m", str(model), "--train", str(train), "--out", str(out), "--batch-size", "4",
            "--group-size", "3", "--lr", "1e-3", "--temperature", "0.05", "--query-max-length", "8",
            "--passage-max-length", "16", *extra]


# -----------------------------------------------------------------------------
# Sampling and collation

def test_sample_group_puts_one_positive_first_then_distinct_negatives():
    ex = TrainExample("q", ["p1", "p2"], [f"n{i}" for i in range(10)], pos_scores=[1.0, 2.0],
                      neg_scores=[float(-i) for i in range(10)])
    for seed in range(20):
        group, scores = sample_group(ex, 5, torch.Generator().manual_seed(seed))
        assert group[0] in ex.pos and len(group) == 5
        assert len(set(group[1:])) == 4 and set(group[1:]) <= set(ex.neg), group
        assert scores == [{"p1": 1.0, "p2": 2.0}[group[0]]] + [-float(n[1:]) for n in group[1:]]
    again = sample_group(ex, 5, torch.Generator().manual_seed(3))
    assert again == sample_group(ex, 5, torch.Generator().manual_seed(3)), "the generator decides everything"


def test_sample_group_tiles_too_few_negatives():
    ex = TrainExample("q", ["p"], ["n0", "n1"])
    group, scores = sample_group(ex, 8, torch.Generator().manual_seed(0))
    negatives = group[1:]
    assert len(negatives) == 7 and scores is None
    assert sorted(set(negatives)) == ["n0", "n1"] and min(negatives.count("n0"), negatives.count("n1")) >= 3
    assert sample_group(ex, 1, torch.Generator())[0] == ["p"]


def test_collator_shapes_instruction_and_prompt(base_model):
    embedder = load_embedder(base_model)
    collate = GroupCollator(embedder, group_size=3, query_max_length=6, passage_max_length=10)
    examples = [TrainExample("cat dog", ["tree " * 20], ["car", "road"]),
                TrainExample("fish", ["bird"], ["red"], prompt="")]
    batch = collate(examples, torch.Generator().manual_seed(0))
    assert batch["query"]["input_ids"].shape[0] == 2 and batch["query"]["input_ids"].shape[1] <= 6
    assert tuple(batch["passages"]["input_ids"].shape) == (6, 10)  # B·G rows, the long positive cut to 10
    assert collate.query_text(examples[0]) == INSTRUCTION + "cat dog"  # the model's own instruction
    assert collate.query_text(examples[1]) == "fish"                   # a line's prompt wins
    assert GroupCollator(embedder, query_instruction="").query_text(examples[0]) == "cat dog"


# -----------------------------------------------------------------------------
# Reading the data: every mistake names its line

@pytest.mark.parametrize("line, message", [
    ('{"query": "a", "pos": ["b"]', "line 2: bad JSON"),
    ('["a", "b"]', "line 2: expected a JSON object"),
    ('{"pos": ["b"]}', 'line 2: "query" must be'),
    ('{"query": "lonely query", "pos": []}', "line 2: query 'lonely query' has no positive"),
    ('{"query": "a", "pos": ["b"], "neg": "c", "neg_scores": [1, 2]}', 'line 2: "neg_scores" must be a list of 1'),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = write_jsonl(tmp_path / "t.jsonl", [training_rows(1)[0], line, training_rows(1)[0]])
    with pytest.raises(DataError, match=message):
        read_train_file(path)
    assert len(read_train_file(path, skip_bad_lines=True)) == 2


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no training examples"):
        read_train_file(write_jsonl(tmp_path / "t.jsonl", ["", "  "]))


def test_cli_bad_input_is_one_line_and_exit_1(base_model, tmp_path, capsys):
    rows = training_rows(8)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:2], "{not json", *rows[2:]])
    assert main(finetune_args(base_model, bad, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0] and err[0].startswith("minibge: error:"), err
    assert not (tmp_path / "out").exists(), "nothing is written for bad data"

    assert main(finetune_args(base_model, bad, tmp_path / "out", "--skip-bad-lines", "--max-steps", "1")) == 0
    assert "line 3 skipped" in capsys.readouterr().err

    no_positive = write_jsonl(tmp_path / "nopos.jsonl", [*rows[:3], {"query": "orphan question", "neg": ["x"]}])
    assert main(finetune_args(base_model, no_positive, tmp_path / "o2")) == 1
    assert "'orphan question' has no positive" in capsys.readouterr().err

    assert main(finetune_args(base_model, write_jsonl(tmp_path / "empty.jsonl", []), tmp_path / "o3")) == 1
    assert "no training examples" in capsys.readouterr().err

    no_negatives = write_jsonl(tmp_path / "noneg.jsonl", [{"query": "q", "pos": ["p"]}] * 8)
    assert main(finetune_args(base_model, no_negatives, tmp_path / "o4")) == 1
    assert "has no negatives" in capsys.readouterr().err
    assert main(finetune_args(base_model, no_negatives, tmp_path / "o4", "--group-size", "1", "--max-steps", "1")) == 0


def test_cli_refuses_an_occupied_output_folder(base_model, tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(8))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    for extra in ([], ["--resume"]):
        assert main(finetune_args(base_model, train, occupied, *extra)) == 1
        assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in occupied.iterdir()) == ["precious.txt"]


# -----------------------------------------------------------------------------
# The result, and resuming

def crash_after(n_batches):
    """A stand-in for finetune.contrastive_step whose loss dies (like Ctrl-C) on batch n+1: a ContrastiveStep
    still, so gradient caching takes it too (inputs() is called once a batch, plain or cached)."""
    class CrashingStep(finetune_module.ContrastiveStep):
        calls = 0

        def inputs(self, batch):
            CrashingStep.calls += 1
            if CrashingStep.calls > n_batches:
                raise KeyboardInterrupt
            return super().inputs(batch)
    return CrashingStep


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
@pytest.mark.parametrize("flag, expected", [([], True), (["--no-onednn"], False)])
def test_loop_flags_reach_the_training_loop(base_model, tmp_path, monkeypatch, command, flag, expected):
    import minibge.train.pretrain as pretrain_module

    seen = {}

    def fake_train(model, loss_fn, batches, config, *args, **kwargs):  # the command's TrainConfig is all I need
        seen["config"] = config
        return {}

    monkeypatch.setattr(finetune_module if command == "finetune" else pretrain_module, "train", fake_train)
    if command == "finetune":
        args = finetune_args(base_model, write_jsonl(tmp_path / "t.jsonl", training_rows(8)), tmp_path / "out", *flag)
    else:
        corpus = write_jsonl(tmp_path / "corpus.txt", [" ".join(WORDS[i:i + 6]) for i in range(8)])
        args = [command, "-m", str(base_model), "--train", str(corpus), "--out", str(tmp_path / "out"), *flag]
    assert main(args) == 0
    assert seen["config"].onednn is expected
    if command == "finetune":
        assert seen["config"].cache_chunk_size is None
        assert main([*args[:args.index("--out") + 1], str(tmp_path / "cached"), *args[args.index("--out") + 2:],
                     "--cache-chunk-size", "7"]) == 0
        assert seen["config"].cache_chunk_size == 7
    else:  # RetroMAE's loss is per text: nothing to cache, and no such option
        assert main([*args, "--cache-chunk-size", "7"]) == 2


@pytest.mark.slow  # imports transformers and sentence-transformers
def test_output_is_a_complete_embedder_folder(base_model, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    out = tmp_path / "out"
    assert main(finetune_args(base_model, train, out, "--epochs", "2")) == 0
    tuned = load_embedder(out)
    assert (tuned.pooling, tuned.max_length, tuned.query_instruction) == ("mean", 48, INSTRUCTION)
    before, after = load_file(base_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after), "the official tensor names are kept"
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed nothing"
    assert not list(out.glob("checkpoint-*")), "checkpoints are removed at the end"

    texts = ["cat dog tree", "protein cell gene drug"]
    ours = torch.from_numpy(tuned.encode(texts))
    transformers = require_module("transformers")
    hf = transformers.AutoModel.from_pretrained(out).eval()
    batch = tuned.tokenize(texts)
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    hf_mean = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(ours, hf_mean, atol=1e-5), f"transformers: {diff_report(ours, hf_mean)}"
    st = require_module("sentence_transformers").SentenceTransformer(str(out), device="cpu")
    st_vectors = torch.from_numpy(st.encode(texts))
    assert torch.allclose(ours, st_vectors, atol=1e-5), f"sentence-transformers: {diff_report(ours, st_vectors)}"


@pytest.mark.slow  # three short trainings; train.py's own resume tests are in the quick tier
def test_resume_after_a_crash_ends_with_the_same_weights(base_model, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(20))
    args = ["--epochs", "2", "--save-steps", "3"]  # 5 steps per epoch, 10 in all
    assert main(finetune_args(base_model, train, tmp_path / "straight", *args)) == 0

    # 9 calls: steps 1-3, the weights check before checkpoint 3, steps 4-6, the check before checkpoint 6,
    # step 7; it dies in step 8, after checkpoint 6
    monkeypatch.setattr(finetune_module, "contrastive_step", crash_after(9))
    assert main(finetune_args(base_model, train, tmp_path / "crashed", *args)) == 130
    assert [p.name for p in (tmp_path / "crashed").glob("checkpoint-*")] == ["checkpoint-6"]
    monkeypatch.undo()
    assert main(finetune_args(base_model, train, tmp_path / "crashed", *args, "--resume")) == 0

    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "crashed" / "model.safetensors")
    for name in straight:
        assert torch.allclose(straight[name].float(), resumed[name].float(), atol=1e-6, rtol=0), \
            f"{name}: {diff_report(straight[name].float(), resumed[name].float())}"
    log = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "train_log.jsonl").read_text().splitlines()]
    assert log == [10], "the log has each step once"


@pytest.mark.slow  # three short trainings with gradient caching
def test_resume_with_gradient_caching_is_bit_identical(base_model, tmp_path, monkeypatch):
    """Dropout on, 4 queries × 3 passages a batch embedded 3 texts at a time: interrupted and resumed, the
    run ends with exactly the uninterrupted run's weights, and caching on or off is a how, not a what."""
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(20))
    args = ["--epochs", "2", "--save-steps", "3", "--cache-chunk-size", "3"]
    assert main(finetune_args(base_model, train, tmp_path / "straight", *args)) == 0

    monkeypatch.setattr(finetune_module, "contrastive_step", crash_after(7))  # dies in step 8, after checkpoint 6
    assert main(finetune_args(base_model, train, tmp_path / "crashed", *args)) == 130
    monkeypatch.undo()
    assert main(finetune_args(base_model, train, tmp_path / "crashed", *args, "--resume")) == 0
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "crashed" / "model.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), f"{name}: {diff_report(straight[name], resumed[name])}"

    # a run may be resumed with another chunk size (say, after running out of memory)
    monkeypatch.setattr(finetune_module, "contrastive_step", crash_after(2))
    assert main(finetune_args(base_model, train, tmp_path / "other", *args)) == 130
    monkeypatch.undo()
    assert main(finetune_args(base_model, train, tmp_path / "other", *args[:-1], "5", "--resume")) == 0


def test_resume_refuses_a_different_run(base_model, tmp_path, capsys, monkeypatch):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(20))
    monkeypatch.setattr(finetune_module, "contrastive_step", crash_after(2))
    assert main(finetune_args(base_model, train, tmp_path / "run", "--save-steps", "1")) == 130
    monkeypatch.undo()
    assert main(finetune_args(base_model, train, tmp_path / "run", "--save-steps", "1", "--resume",
                              "--temperature", "0.1")) == 1
    assert "different run (it differs in temperature)" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Mining

def test_mining_takes_the_rank_window_and_drops_positives(base_model, tmp_path):
    embedder = load_embedder(base_model)
    pool = [" ".join(WORDS[i:i + 4]) for i in range(len(WORDS) - 4)]
    examples = [TrainExample(WORDS[i] + " " + WORDS[i + 1], [pool[i]], []) for i in range(4)]
    mined = mine_hard_negatives(embedder, examples, pool, window=(2, 8), negatives=4, seed=0)
    q = torch.from_numpy(embedder.encode_queries([ex.query for ex in examples]))
    ranking = (q @ torch.from_numpy(embedder.encode(pool)).T).argsort(dim=1, descending=True)
    for ex, record, ranks in zip(examples, mined, ranking.tolist()):
        window = {pool[j] for j in ranks[2:8]} - set(ex.pos)
        assert record["pos"] == ex.pos and len(record["neg"]) == 4 and len(set(record["neg"])) == 4
        assert set(record["neg"]) <= window, "negatives come from ranks 2-8 only"
    # a window with fewer candidates than asked for: topped up with other pool passages, never positives
    topped = mine_hard_negatives(embedder, examples, pool, window=(0, 2), negatives=6)
    assert all(len(r["neg"]) == 6 and not set(r["neg"]) & set(r["pos"]) for r in topped)


def test_mine_cli_writes_the_training_format(base_model, tmp_path, capsys):
    rows = training_rows(6, n_neg=2)
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"title": "t", "text": " ".join(WORDS[i:i + 5])} for i in range(20)])
    out = tmp_path / "mined.jsonl"
    assert main(["mine", "-m", str(base_model), "--input", str(train), "--output", str(out), "--corpus", str(corpus),
                 "--range", "1-10", "--negatives", "3"]) == 0
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["query"] for m in mined] == [r["query"] for r in rows]
    assert all(len(m["neg"]) == 3 and all(n.startswith("t ") for n in m["neg"]) for m in mined)
    assert main(["mine", "-m", str(base_model), "--input", str(train), "--output", str(out), "--range", "9-3"]) == 2
    assert "start < end" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# torchrun: two CPU processes, gloo, cross-device negatives

@pytest.mark.slow
def test_torchrun_two_processes(base_model, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", training_rows(16))
    out = tmp_path / "out"
    torchrun_minibge(*finetune_args(base_model, train, out, "--epochs", "2", "--log-steps", "1"))
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] and run["run"]["cross_device"] is True
    assert logged_steps(out) == [1, 2, 3, 4], "16 queries / (4 per rank × 2 ranks) = 2 steps per epoch, logged once each"
    assert load_embedder(out).pooling == "mean"
