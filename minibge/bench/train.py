"""The training-step half of `minibge bench`: one contrastive step, minibge vs transformers.

A step is what `minibge finetune` repeats: embed B queries and B·G passages with dropout on,
InfoNCE over in-batch negatives (temperature 0.02), backward, AdamW. Both sides start from the
same checkpoint, see the same token ids (minibge's tokenizer, right-padded per batch) and use
the same loss code; only the encoder differs: minibge's BertModel or transformers' BertModel
(SDPA), pooled the checkpoint's way. Steps alternate between the sides, after one warm-up each,
and the median over steps is reported as real (unpadded) tokens per second.

"minibge BertModel" is the model as `minibge finetune` trains it: on the CPU in fp32 its Linears
compute through oneDNN (minibge/train/loop.py, minibge/fast/onednn.py). "minibge BertModel, MKL (no oneDNN)" is the
same model on PyTorch's default matmuls, as `--no-onednn` trains it, and as transformers runs:
the gap between the two rows is what oneDNN buys; the gap to transformers' row, the rest.
"minibge BertModel, bf16 autocast" is `--precision bf16` on a CPU that multiplies bf16 in hardware
(common.cpu_has_native_bf16; the row is left out elsewhere, where the loop refuses bf16): the
forward and the loss under torch.autocast("cpu", bfloat16), fp32 weights and AdamW state, the
Linears on PyTorch's F.linear (bf16 through oneDNN's own kernels), as train/loop.py runs it.

cached_step_benchmark: one step of `minibge finetune` at growing batch sizes (group size 4), plain
and with gradient caching (minibge/train/gradcache.py), with the bytes saved for backward (the
activations, a size) beside the peak resident memory and the tokens/s.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..common import cpu_has_native_bf16
from ..fast import onednn
from .timing import PeakRSS
from ..embedder import load_embedder
from ..losses import info_nce
from ..model import POOLING, l2_normalize

QUERIES, GROUP, QUERY_LEN, PASSAGE_LEN = 16, 2, 32, 128  # FlagEmbedding's default max lengths


def training_batches(embedder, queries: list[str], passages: list[str]):
    """The same tokenized (query batch, passage batch) for both encoders."""
    take = lambda texts, n: [texts[i % len(texts)] for i in range(n)]  # cycles through short lists
    q = embedder.tokenize(take(queries, QUERIES), max_length=QUERY_LEN)
    p = embedder.tokenize(take(passages, QUERIES * GROUP), max_length=PASSAGE_LEN)
    return q, p


def minibge_step(embedder, optimizer, autocast_dtype: torch.dtype | None = None):
    """One step as the loop takes it: forward and loss under autocast (when a dtype is given), backward after."""
    def step(q, p):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = info_nce(embedder.embed(q).float(), embedder.embed(p).float(), temperature=0.02)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def transformers_step(model, pooling: str, optimizer):
    def embed(batch):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return l2_normalize(POOLING[pooling](hidden, batch["attention_mask"]))

    def step(q, p):
        loss = info_nce(embed(q), embed(p), temperature=0.02)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def train_step_benchmark(folder, queries: list[str], passages: list[str], steps: int = 5) -> list[dict]:
    """Median seconds and tokens/s of a contrastive step, minibge (fp32 on oneDNN, fp32 on MKL, and bf16
    autocast where the CPU has native bf16) and transformers, interleaved."""
    import transformers

    embedder, mkl_embedder = load_embedder(folder, device="cpu"), load_embedder(folder, device="cpu")
    onednn.use_onednn_linears(embedder.model)  # what train/loop.py does for `minibge finetune` on a CPU (fp32)
    trained = [embedder.model, mkl_embedder.model]
    reference = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").train()
    steps_by_name = {  # each side its own copy of the weights and its own optimizer
        "minibge BertModel": minibge_step(embedder, torch.optim.AdamW(embedder.model.parameters(), lr=1e-5)),
        "minibge BertModel, MKL (no oneDNN)": minibge_step(
            mkl_embedder, torch.optim.AdamW(mkl_embedder.model.parameters(), lr=1e-5)),
    }
    if cpu_has_native_bf16():  # `--precision bf16`: plain nn.Linears, which autocast casts (train/loop.py)
        bf16_embedder = load_embedder(folder, device="cpu")
        trained.append(bf16_embedder.model)
        steps_by_name["minibge BertModel, bf16 autocast"] = minibge_step(
            bf16_embedder, torch.optim.AdamW(bf16_embedder.model.parameters(), lr=1e-5), torch.bfloat16)
    steps_by_name["transformers BertModel (SDPA)"] = transformers_step(
        reference, embedder.pooling, torch.optim.AdamW(reference.parameters(), lr=1e-5))
    for model in trained:
        model.train()
    q, p = training_batches(embedder, queries, passages)
    tokens = int(q["attention_mask"].sum() + p["attention_mask"].sum())
    times = {name: [] for name in steps_by_name}
    memory = dict.fromkeys(steps_by_name, 0.0)
    for name, step in steps_by_name.items():
        step(q, p)  # warm-up
    for _ in range(steps):
        for name, step in steps_by_name.items():
            with PeakRSS() as rss:
                start = time.perf_counter()
                step(q, p)
                times[name].append(time.perf_counter() - start)
            memory[name] = max(memory[name], rss.extra_mb)
    reference_median = statistics.median(times["transformers BertModel (SDPA)"])
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append({"step": name, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
                     "tokens_per_s": tokens / median, "vs_transformers": reference_median / median,
                     "peak_extra_mb": memory[name], "tokens": tokens,
                     "batch": f"{QUERIES} queries ≤ {QUERY_LEN} tokens + {QUERIES * GROUP} passages ≤ {PASSAGE_LEN}"})
    return rows


def markdown(rows: list[dict], model_name: str) -> str:
    lines = [f"### Contrastive training step, {model_name}: {rows[0]['batch']} ({rows[0]['tokens']} real tokens)", "",
             "| step | tokens/s | × transformers | median s (min–max) | peak extra MB |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['tokens_per_s']:,.0f} | {r['vs_transformers']:.2f} | "
              f"{r['median_s']:.2f} ({r['min_s']:.2f}–{r['max_s']:.2f}) | {r['peak_extra_mb']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Gradient caching: one step's memory and speed as the batch grows (minibge/train/gradcache.py)

CACHE_GROUP = 4  # passages per query: the positive + 3 hard negatives


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), so the next row's peak RSS starts low."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cached_step_benchmark(folder, queries: list[str], passages: list[str], batches=(32, 128, 512, 2048),
                          chunk_size: int = 32, plain_max_batch: int = 512) -> list[dict]:
    """One training step (InfoNCE, group size 4, backward, AdamW) at each batch size, plain and with
    gradient caching: seconds, real tokens/s, the peak bytes saved for backward (SavedTensorBytes: the
    activations, a size) and the peak extra resident memory (PeakRSS: everything, noisier). Plain
    steps above plain_max_batch queries are not run (their activations would not fit a shared machine)."""
    from ..train.finetune import ContrastiveStep
    from ..train.gradcache import cached_step
    from .timing import SavedTensorBytes

    embedder = load_embedder(folder, device="cpu")
    onednn.use_onednn_linears(embedder.model)  # as `minibge finetune` trains on a CPU (fp32)
    embedder.model.train()
    step = ContrastiveStep(embedder, temperature=0.02)
    optimizer = torch.optim.AdamW(embedder.model.parameters(), lr=1e-5)
    take = lambda texts, n: [texts[i % len(texts)] for i in range(n)]  # noqa: E731  cycles through short lists

    def batch_of(n: int) -> dict:
        return {"query": embedder.tokenize(take(queries, n), max_length=QUERY_LEN),
                "passages": embedder.tokenize(take(passages, n * CACHE_GROUP), max_length=PASSAGE_LEN)}

    def one_step(batch: dict, cached: bool) -> None:
        if cached:
            cached_step(step, batch, chunk_size, lambda loss: loss.backward())
        else:
            step(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step(batch_of(min(batches)), cached=True)  # warm-up: oneDNN's kernels, the allocator
    rows = []
    for n in batches:
        batch = batch_of(n)
        tokens = int(batch["query"]["attention_mask"].sum() + batch["passages"]["attention_mask"].sum())
        for cached in (False, True):
            row = {"queries": n, "passages": n * CACHE_GROUP, "tokens": tokens,
                   "step": f"cached (chunk {chunk_size})" if cached else "plain"}
            if not cached and n > plain_max_batch:
                rows.append({**row, "skipped": f"not run (plain steps above {plain_max_batch} queries)"})
                continue
            _release_freed_memory()
            with PeakRSS() as rss, SavedTensorBytes(exclude=embedder.model.parameters()) as saved:
                start = time.perf_counter()
                one_step(batch, cached)
                seconds = time.perf_counter() - start
            rows.append({**row, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "activations_mb": saved.peak_mb, "peak_extra_mb": rss.extra_mb})
    return rows


def cached_markdown(rows: list[dict], model_name: str) -> str:
    lines = [f"### One training step, plain and with gradient caching, {model_name}: group size {CACHE_GROUP}, "
             f"queries ≤ {QUERY_LEN} tokens, passages ≤ {PASSAGE_LEN}", "",
             "| queries (passages) | step | real tokens | s | tokens/s | saved for backward, MB | peak extra RSS, MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['queries']} ({r['passages']}) | {r['step']} | {r['tokens']:,} |"
        if "skipped" in r:
            lines.append(f"{head} {r['skipped']} | | | |")
        else:
            lines.append(f"{head} {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['activations_mb']:,.0f} | "
                         f"{r['peak_extra_mb']:,.0f} |")
    return "\n".join(lines) + "\n"
