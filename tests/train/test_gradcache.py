"""Gradient caching (minibge/train/gradcache.py): the cached step's gradient is the plain full-batch
gradient (tiny model with dropout, the real all-MiniLM-L6-v2, two torchrun ranks with cross-device
negatives), its activations stay flat as the batch grows, and the loop runs it (accumulation, refusals)."""
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minibge import BertConfig, BertModel, Embedder, Tokenizer, load_embedder
from minibge.bench.timing import SavedTensorBytes
from minibge.train import Batches, TrainConfig, train
from minibge.train import gradcache
from minibge.train.finetune import ContrastiveStep

from conftest import REPO_ROOT, TINY

B, G = 64, 4                      # the acceptance batch: 64 queries × groups of 4 passages
CHUNKS = (1, 7, 32)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# -----------------------------------------------------------------------------
# Helpers: a tiny embedder, token batches, the gradient comparison

def tiny_embedder(tmp_path, dropout=0.1, seed=0) -> Embedder:
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS]) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(**{**TINY, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout})
    return Embedder(BertModel(config).train(), Tokenizer.from_pretrained(tmp_path), pooling="mean", max_length=64)


def tokens(n, length, seed, vocab=TINY["vocab_size"]):
    """n right-padded rows of random ids, lengths 3..length (the first row full)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def contrastive_batch(queries=B, group=G, query_length=12, passage_length=24, seed=0, teacher=True):
    batch = {"query": tokens(queries, query_length, seed), "passages": tokens(queries * group, passage_length, seed + 1)}
    if teacher:
        batch["teacher_scores"] = torch.randn(queries, group, generator=torch.Generator().manual_seed(seed + 2))
    return batch


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# The key projection's bias adds the same q·b_k to every score of a softmax row, which the softmax
# ignores: its gradient is exactly 0 in exact arithmetic, and in fp32 it is rounding noise (~1e-9 on
# MiniLM), which no "within 1e-3 of its largest entry" can hold to. It must stay noise-sized instead.
ZERO_IN_EXACT_ARITHMETIC = ("attention.key.bias",)


def assert_same_gradient(cached: dict, plain: dict, label: str) -> float:
    """The acceptance criterion: relative L2 error over all parameters ≤ 1e-5, and every tensor within
    1e-3 of its own largest entry (but the ZERO_IN_EXACT_ARITHMETIC ones). Returns the relative error."""
    assert cached.keys() == plain.keys(), f"{label}: gradients for different parameters"
    error = math.sqrt(sum(float((cached[k] - plain[k]).double().square().sum()) for k in plain))
    norm = math.sqrt(sum(float(plain[k].double().square().sum()) for k in plain))
    assert norm > 0, f"{label}: the plain gradient is zero"
    assert error / norm <= 1e-5, f"{label}: ||g_cached - g_plain|| / ||g_plain|| = {error / norm:.3e}"
    largest = max(float(g.abs().max()) for g in plain.values())
    for name in plain:
        worst, scale = float((cached[name] - plain[name]).abs().max()), float(plain[name].abs().max())
        if name.endswith(ZERO_IN_EXACT_ARITHMETIC):
            assert scale <= 1e-5 * largest, f"{label}: {name} should be rounding noise, its largest entry is {scale:.3e}"
            continue
        assert worst <= 1e-3 * scale, f"{label}: {name}: max |diff| {worst:.3e} vs its largest entry {scale:.3e}"
    print(f"{label}: ||g_cached - g_plain|| / ||g_plain|| = {error / norm:.2e}")
    return error / norm


def plain_gradient(step, model, batch, seed, chunk_size=None) -> dict:
    """The full-batch gradient: one loss over the whole batch, one backward through one graph. With
    chunk_size, the forward runs chunk by chunk (still one graph), so dropout draws what the cached
    step draws; without, it is step(batch) itself."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if chunk_size is None:
        step(batch)["loss"].backward()
    else:
        embeddings = {name: torch.cat([step.embed(part) for part in gradcache.chunks(rows, chunk_size)])
                      for name, rows in step.inputs(batch).items()}
        step.loss(embeddings, batch)["loss"].backward()
    return gradients(model)


def cached_gradient(step, model, batch, seed, chunk_size) -> dict:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    gradcache.cached_step(step, batch, chunk_size, lambda loss: loss.backward())
    return gradients(model)


# -----------------------------------------------------------------------------
# Gradient equality

@pytest.mark.parametrize("queries, chunk_sizes, checkpointing", [
    (8, (3,), False),                                                   # the quick tier's
    pytest.param(B, CHUNKS, False, marks=pytest.mark.slow),             # the acceptance batch
    pytest.param(B, CHUNKS, True, marks=pytest.mark.slow),              # ... with gradient checkpointing
])
def test_cached_gradient_equals_the_plain_one_with_dropout(tmp_path, queries, chunk_sizes, checkpointing):
    """Tiny model, dropout 0.1, distillation on: for each chunk size the cached gradient is the full-batch
    gradient with the same dropout draws; a chunk as big as the batch is step(batch) itself."""
    embedder = tiny_embedder(tmp_path)
    embedder.model.gradient_checkpointing = checkpointing
    step, batch = ContrastiveStep(embedder, temperature=0.05), contrastive_batch(queries)
    for chunk in chunk_sizes:
        assert_same_gradient(cached_gradient(step, embedder.model, batch, 3, chunk),
                             plain_gradient(step, embedder.model, batch, 3, chunk), f"{queries} queries, chunk {chunk}")
    whole = queries * G
    assert_same_gradient(cached_gradient(step, embedder.model, batch, 3, whole),
                         plain_gradient(step, embedder.model, batch, 3), f"{queries} queries, one chunk")


def test_without_the_rng_restored_dropout_would_differ(tmp_path, monkeypatch):
    """What the saved RNG states are for: skip restoring them and the gradient is another one."""
    embedder = tiny_embedder(tmp_path)
    step, batch = ContrastiveStep(embedder, temperature=0.05), contrastive_batch(queries=16)
    plain = plain_gradient(step, embedder.model, batch, 3, 7)
    monkeypatch.setattr(gradcache.RandomState, "restore", lambda self: None)
    with pytest.raises(AssertionError, match="g_cached - g_plain"):
        assert_same_gradient(cached_gradient(step, embedder.model, batch, 3, 7), plain, "no RNG restore")


def test_the_rng_continues_as_after_one_plain_forward(tmp_path):
    """Step 3 replays, it draws nothing new: with one chunk, the RNG ends where a plain step leaves it."""
    embedder = tiny_embedder(tmp_path)
    step, batch = ContrastiveStep(embedder, temperature=0.05), contrastive_batch(queries=8)
    torch.manual_seed(5)
    with torch.no_grad():
        step(batch)
    after_plain = torch.get_rng_state()
    torch.manual_seed(5)
    gradcache.cached_step(step, batch, 8 * G, lambda loss: loss.backward())
    assert torch.equal(torch.get_rng_state(), after_plain)


def test_cached_gradient_under_cpu_autocast(tmp_path):
    """bf16 autocast around every forward (what the loop does on CUDA): the gradients agree to bf16 rounding."""
    embedder = tiny_embedder(tmp_path, dropout=0.0)
    step, batch = ContrastiveStep(embedder, temperature=0.05), contrastive_batch(queries=16)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    embedder.model.zero_grad()
    with autocast():
        step(batch)["loss"].backward()
    plain = gradients(embedder.model)
    embedder.model.zero_grad()
    gradcache.cached_step(step, batch, 7, lambda loss: loss.backward(), autocast=autocast)
    cached = gradients(embedder.model)
    error = math.sqrt(sum(float((cached[k] - plain[k]).square().sum()) for k in plain))
    norm = math.sqrt(sum(float(plain[k].square().sum()) for k in plain))
    assert error / norm < 3e-2, f"relative error {error / norm:.3e} under bf16 autocast"


@pytest.mark.slow  # the real model, 320 texts, three chunk sizes (~1 min on one core)
def test_cached_gradient_equals_the_plain_one_on_minilm(minilm_dir):
    embedder = load_embedder(minilm_dir)
    model = embedder.model.train()
    for module in model.modules():  # dropout 0: the plain step is then deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    words = ("protein cell gene drug trial cancer risk patients study dose blood brain heart virus immune "
             "mouse human tissue level effect").split()
    gen = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist())
    queries = [text(int(torch.randint(4, 12, (), generator=gen))) for _ in range(B)]
    passages = [text(int(torch.randint(10, 50, (), generator=gen))) for _ in range(B * G)]
    batch = {"query": embedder.tokenize(queries, 32), "passages": embedder.tokenize(passages, 64)}
    step = ContrastiveStep(embedder, temperature=0.05)
    plain = plain_gradient(step, model, batch, 0)
    for chunk in CHUNKS:
        assert_same_gradient(cached_gradient(step, model, batch, 0, chunk), plain, f"MiniLM, chunk {chunk}")


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = {paths!r}  # this file's folder and tests/ (conftest)
    from test_gradcache import contrastive_batch, tiny_embedder, B, G, CHUNKS
    from minibge.common import rank_and_world, setup_distributed
    from minibge.train import average_gradients, gradcache
    from minibge.train.finetune import ContrastiveStep
    from pathlib import Path

    torch.set_num_threads(1)
    setup_distributed()
    rank, world = rank_and_world()
    out = Path(sys.argv[1])
    embedder = tiny_embedder(out / f"vocab{{rank}}", dropout=0.0)   # the same weights on both ranks
    full, n = contrastive_batch(), B // world                        # every rank builds the global batch ...
    mine = {{"query": {{k: v[rank * n:(rank + 1) * n] for k, v in full["query"].items()}},  # ... and takes its slice
            "passages": {{k: v[rank * n * G:(rank + 1) * n * G] for k, v in full["passages"].items()}},
            "teacher_scores": full["teacher_scores"][rank * n:(rank + 1) * n]}}
    step = ContrastiveStep(embedder, temperature=0.05, cross_device=True)
    for chunk in CHUNKS:
        embedder.model.zero_grad(set_to_none=True)
        losses = gradcache.cached_step(step, mine, chunk, lambda loss: loss.backward())
        average_gradients(embedder.model)                            # what the loop does after backward
        grads = {{k: p.grad for k, p in embedder.model.named_parameters() if p.grad is not None}}
        torch.save({{"info_nce": float(losses["info_nce"].detach()), "grads": grads}}, out / f"rank{{rank}}_chunk{{chunk}}.pt")
    # a gloo group left for interpreter shutdown can abort the process ("terminate called without an
    # active exception"): both ranks leave it together first
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow  # two torchrun processes
def test_two_torchrun_ranks_with_cross_device_negatives(tmp_path):
    """2 gloo ranks × 32 queries, cross-device negatives, cached: the averaged gradient is the plain
    gradient of one process on all 64 queries (the local slice's gradient and losses.py's ×W)."""
    for rank in range(2):
        (tmp_path / f"vocab{rank}").mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(paths=[str(Path(__file__).resolve().parent), str(REPO_ROOT / "tests")]))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    embedder = tiny_embedder(tmp_path, dropout=0.0)
    step, batch = ContrastiveStep(embedder, temperature=0.05), contrastive_batch()
    losses = step(batch)
    losses["loss"].backward()
    plain = gradients(embedder.model)
    # distillation is a mean over each rank's own queries; averaged over the two ranks it is the
    # mean over all 64, as in one process
    for chunk in CHUNKS:
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}_chunk{chunk}.pt")
            expected = losses["info_nce"].item()
            assert abs(got["info_nce"] - expected) < 1e-5, f"rank {rank}: loss {got['info_nce']} vs one process {expected}"
            assert_same_gradient(got["grads"], plain, f"rank {rank}, chunk {chunk}")


# -----------------------------------------------------------------------------
# Memory: a size, not a time

def step_activations(embedder, queries, chunk_size=None, passage_length=48) -> int:
    """Peak bytes saved for backward during one step (cached with chunk_size, else plain)."""
    step = ContrastiveStep(embedder, temperature=0.05)
    batch = contrastive_batch(queries, G, 16, passage_length, seed=queries, teacher=False)
    embedder.model.zero_grad(set_to_none=True)
    with SavedTensorBytes(exclude=embedder.model.parameters()) as saved:
        if chunk_size is None:
            step(batch)["loss"].backward()
        else:
            gradcache.cached_step(step, batch, chunk_size, lambda loss: loss.backward())
    assert saved.bytes == 0, "every saved tensor is released after backward"
    return saved.peak


@pytest.mark.slow  # the plain step at 512 queries holds ~850 MB of activations
def test_cached_memory_stays_flat_as_the_batch_grows(tmp_path):
    embedder = tiny_embedder(tmp_path)
    cached_32, cached_512 = step_activations(embedder, 32, 32), step_activations(embedder, 512, 32)
    plain_32, plain_512 = step_activations(embedder, 32), step_activations(embedder, 512)
    report = (f"saved for backward, MB: cached (chunk 32) batch 32 {cached_32 / 2**20:.1f}, batch 512 "
              f"{cached_512 / 2**20:.1f}; plain batch 32 {plain_32 / 2**20:.1f}, batch 512 {plain_512 / 2**20:.1f}")
    print(report)
    assert cached_512 <= 1.5 * cached_32, report
    assert plain_512 >= 10 * plain_32, report + " (the plain step's activations grow with the batch)"
    assert plain_512 >= 5 * cached_512, report


# -----------------------------------------------------------------------------
# The loop

def test_the_loop_with_caching_takes_the_plain_steps(tmp_path):
    """Dropout 0, accumulation 2: train() with cache_chunk_size ends with the weights it ends with without."""
    batches_seen = [contrastive_batch(queries=8, seed=s, teacher=False) for s in range(8)]
    finals = {}
    for chunk in (None, 5):
        embedder = tiny_embedder(tmp_path, dropout=0.0)
        config = TrainConfig(max_steps=2, batch_size=1, grad_accumulation=2, lr=1e-3, cache_chunk_size=chunk,
                             warmup_ratio=0.0)
        batches = Batches(batches_seen, lambda examples, generator: examples[0], batch_size=1, shuffle=False)
        train(embedder.model, ContrastiveStep(embedder, 0.05), batches, config, tmp_path / f"out{chunk}")
        finals[chunk] = {k: v.clone() for k, v in embedder.model.state_dict().items()}
    for name, plain in finals[None].items():
        assert torch.allclose(finals[5][name], plain, atol=1e-6, rtol=0), name
    assert any(not torch.equal(finals[None][k], tiny_embedder(tmp_path, 0.0).model.state_dict()[k]) for k in finals[None])


def test_the_loop_refuses_caching_for_a_loss_not_split_at_the_embeddings(tmp_path):
    model = torch.nn.Linear(2, 1)
    batches = Batches([torch.zeros(2)] * 4, lambda examples, generator: torch.stack(examples), batch_size=2)
    with pytest.raises(ValueError, match="cache_chunk_size needs a loss split at the embeddings"):
        train(model, lambda x: {"loss": model(x).sum()}, batches, TrainConfig(batch_size=2, cache_chunk_size=4),
              tmp_path / "out")
    assert not (tmp_path / "out").exists(), "refused before the output folder is touched"


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_config_rejects_a_bad_chunk_size(value):
    with pytest.raises(ValueError, match="cache_chunk_size"):
        TrainConfig(cache_chunk_size=value)
