"""`minibge bench`: minibge's encode against every peer, in one process, on the same texts.

    minibge bench                                   # MiniLM on STS-B + SciFact, all peers, 3 rounds
    minibge bench --models minilm bge-small --rounds 5 --threads 2 --markdown docs/benchmarks.md

Comparing libraries across runs on a shared machine measures the machine, not the libraries, so
everything here happens in one process, under one thread count, on one checkpoint folder:

    for round in 1..R:                        the peers take turns inside every round (rotated),
        for peer in peers (rotated by round): so a burst of load elsewhere hits them all alike
            time peer.encode(texts)

and each peer gets its median over rounds, its spread (min..max), and its ratio to
sentence-transformers' median. Peers: minibge encode (the default fast path, each of its options
and speed modes, and the plain path with both attention implementations), transformers'
BertModel (SDPA) driven as FlagEmbedding drives it,
sentence-transformers, ONNX Runtime (with and without its BERT graph optimizer, and int8) and
OpenVINO (fp32, the CPU's default precision, int8 by NNCF's static quantisation, calibrated on STS-B
dev sentences and SciFact abstracts that are not timed: calibration_texts, and int8 weights with
activations quantised at run time, which needs no calibration). The references are optional
(`pip install minibge[bench]`); a peer whose library is missing is listed as skipped.

Useful work is counted the same for every peer, from the real (unpadded) token counts: for a text
of n tokens, each of L layers costs 2·n·(4H² + 2HI) FLOPs in its matmuls and 4·n²·H in attention
(minibge.model.encoder_flops, which derives the count).
The matmul peak is a (2048 × 2048) fp32 product timed in the same run, under the same threads.
The peers live in peers.py, the contrastive training-step benchmark in train.py (both in minibge/bench/).
"""
from __future__ import annotations

import datetime
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import BertConfig, preset
from ..embedder import Embedder, load_embedder
from ..evaluate.data import load_beir, load_sts_csv
from ..evaluate.tasks import spearman
from ..fast.kernels import cpu_model
from ..model import BertModel, encoder_flops
from .peers import all_peers
from .timing import PeakRSS, matmul_peaks

logger = logging.getLogger(__name__)

MINILM = Path(__file__).resolve().parents[2] / "weights" / "all-MiniLM-L6-v2"
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "eval" / "data"
RANDOM_PRESETS = {"bge-small": "bge-small-en-v1.5", "bge-base": "bge-base-en-v1.5"}
# a 2-layer, 128-wide BERT (BERT-tiny's shape), random weights: the training rows on a machine too slow for MiniLM
TINY_SHAPE = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512, max_position_embeddings=512)
MODELS = ("minilm", "tiny", *RANDOM_PRESETS)
WORKLOADS = ("stsb", "scifact")


# -----------------------------------------------------------------------------
# Workloads and model folders

@dataclass
class Workload:
    name: str
    texts: list
    pairs: tuple | None = None  # (sentences1, sentences2, gold) for a Spearman score beside the speed


def load_workloads(data_dir: Path, names, scifact_docs: int, stsb_texts: int | None = None) -> list[Workload]:
    """STS-B test (each distinct sentence once; the first `stsb_texts` pairs' when given) and the
    first `scifact_docs` SciFact abstracts."""
    workloads = []
    if "stsb" in names and (data_dir / "stsbenchmark" / "sts-test.csv").is_file():
        s1, s2, gold = (column[:stsb_texts] for column in load_sts_csv(data_dir / "stsbenchmark" / "sts-test.csv"))
        workloads.append(Workload("STS-B test", list(dict.fromkeys(s1 + s2)), (s1, s2, gold)))
    if "scifact" in names and (data_dir / "scifact").is_dir():
        corpus, _, _ = load_beir(data_dir / "scifact")
        workloads.append(Workload("SciFact abstracts", [doc["text"] for doc in list(corpus.values())[:scifact_docs]]))
    missing = set(names) - {"stsb" if w.pairs else "scifact" for w in workloads}
    if missing:
        logger.warning("skipping workloads %s: no data under %s", sorted(missing), data_dir)
    return workloads


def calibration_texts(data_dir: Path, scifact_docs: int, sentences: int = 200, abstracts: int = 100) -> list[str]:
    """The texts the OpenVINO int8 peer calibrates on, none of them timed: STS-B *dev* sentences not
    also in the test set (the timed ones are the test set's; a few sentences are in both) and SciFact
    abstracts from the end of the corpus (the timed ones are its first `scifact_docs`), so both text
    lengths the bench measures are in the calibration."""
    texts = []
    sts = data_dir / "stsbenchmark"
    if (sts / "sts-dev.csv").is_file():
        s1, s2, _ = load_sts_csv(sts / "sts-dev.csv")
        t1, t2, _ = load_sts_csv(sts / "sts-test.csv") if (sts / "sts-test.csv").is_file() else ([], [], [])
        timed = set(t1 + t2)
        texts += [s for s in dict.fromkeys(s1 + s2) if s not in timed][:sentences]
    if (data_dir / "scifact").is_dir():
        corpus, _, _ = load_beir(data_dir / "scifact")
        texts += [doc["text"] for doc in list(corpus.values())[scifact_docs:][-abstracts:]]
    return texts


def model_folder(name: str, folder: Path) -> Path:
    """The real MiniLM folder, or a random-weight BGE-shaped embedder folder in the official layout
    (MiniLM's uncased WordPiece vocabulary is BGE's English one)."""
    if name == "minilm":
        return MINILM
    torch.manual_seed(0)
    tokenizer = load_embedder(MINILM, device="cpu").tokenizer
    config = BertConfig(**TINY_SHAPE) if name == "tiny" else preset(RANDOM_PRESETS[name])
    Embedder(BertModel(config).eval(), tokenizer, pooling="cls", max_length=512, name=name).save_pretrained(folder)
    return folder


# -----------------------------------------------------------------------------
# Running

def build_peers(peers, folder, embedder, workloads):
    """Build every peer; one that cannot be built (missing library, unsupported CPU) is skipped."""
    for peer in peers:
        start = time.perf_counter()
        try:
            peer.encode = peer.build(folder, embedder)
            peer.encode(workloads[0].texts[:4])  # warm-up (and, for torch.compile, the first compile)
        except Exception as err:  # optional peers fail in many library-specific ways
            peer.skipped = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            logger.warning("skipping %s: %s", peer.name, peer.skipped)
        peer.setup_s = time.perf_counter() - start


def run_rounds(peers, workloads, rounds: int):
    live = [p for p in peers if p.encode is not None]
    for r in range(rounds):
        for workload in workloads:
            for peer in live[r % len(live):] + live[:r % len(live)]:  # rotate who goes first
                with PeakRSS() as memory:
                    start = time.perf_counter()
                    vectors = peer.encode(workload.texts)
                    seconds = time.perf_counter() - start
                peer.times.setdefault(workload.name, []).append(seconds)
                peer.memory[workload.name] = max(peer.memory.get(workload.name, 0.0), memory.extra_mb)
                if r == 0:
                    peer.vectors[workload.name] = np.asarray(vectors, dtype=np.float32)
                logger.info("round %d %s %s: %.2fs", r, workload.name, peer.name, seconds)


def sts_spearman(workload: Workload, vectors) -> float | None:
    if workload.pairs is None:
        return None
    s1, s2, gold = workload.pairs
    where = {text: i for i, text in enumerate(workload.texts)}
    a, b = vectors[[where[s] for s in s1]], vectors[[where[s] for s in s2]]
    return 100 * spearman((a * b).sum(1), np.asarray(gold))


def summarise(model_name, embedder, peers, workloads) -> list[dict]:
    rows = []
    reference = peers[0]
    plain = next((p for p in peers if p.name == "minibge plain path (sdpa)" and p.vectors), None)
    for workload in workloads:
        lengths = [len(ids) for ids in embedder.tokenizer.encode_batch(workload.texts, embedder.max_length)]
        flops = encoder_flops(embedder.model.config, lengths)
        ref_median = statistics.median(reference.times[workload.name]) if reference.times else None
        for peer in peers:
            row = {"model": model_name, "workload": workload.name, "texts": len(workload.texts),
                   "mean_tokens": float(np.mean(lengths)), "peer": peer.name}
            if peer.skipped or workload.name not in peer.times:
                rows.append({**row, "skipped": peer.skipped or "not run"})
                continue
            times = peer.times[workload.name]
            median = statistics.median(times)
            vectors = peer.vectors[workload.name]
            row.update(median_s=median, min_s=min(times), max_s=max(times), rounds=len(times),
                       texts_per_s=len(lengths) / median, tokens_per_s=sum(lengths) / median,
                       gflops=flops / median / 1e9,
                       vs_reference=ref_median / median if ref_median else None,
                       peak_extra_mb=peer.memory[workload.name], setup_s=peer.setup_s,
                       stsb_spearman=sts_spearman(workload, vectors))
            if plain is not None:
                row["max_one_minus_cos"] = float(1 - (vectors.astype(np.float64) *
                                                      plain.vectors[workload.name]).sum(1).min())
            rows.append(row)
    return rows


def machine() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    interesting = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8"]
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "cpu_flags": [f for f in interesting if f in flags], "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run_benchmark(models, workload_names, rounds, scifact_docs, stsb_texts=None, data_dir=DATA_DIR,
                  speed_options=True, peer_filter=None, train_steps=0, cache_batches=(), cache_chunk_size=32,
                  plain_max_batch=512, encode=True) -> dict:
    """The whole benchmark; returns {"machine", "peak_gflops", "rows", "train", "cached", "kernels"}. encode=False
    skips the encode peers (the training rows only); cache_batches: the gradient-caching rows' batch sizes."""
    results = {"machine": machine(), "rows": [], "train": {}, "cached": {}, "kernels": {},
               "peaks_start": matmul_peaks()}
    workloads = load_workloads(Path(data_dir), workload_names, scifact_docs, stsb_texts)
    if not workloads:
        raise ValueError(f"no benchmark data under {data_dir}: expected stsbenchmark/ and/or scifact/")
    calibration = lambda: calibration_texts(Path(data_dir), scifact_docs)  # read only if the OpenVINO int8 peer runs
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            folder = model_folder(model_name, Path(tmp) / model_name)
            if encode:
                embedder = load_embedder(folder, device="cpu")
                # the matmul and attention routes, measured per machine (fast/kernels.py)
                results["kernels"][model_name] = "; ".join(f"{what}: {how}" for what, how in
                                                           embedder.fast_encoder.kernel_report())
                peers = [p for p in all_peers(speed_options, calibration) if peer_filter is None or peer_filter(p.name)]
                build_peers(peers, folder, embedder, workloads)
                run_rounds(peers, workloads, rounds)
                results["rows"] += summarise(model_name, embedder, peers, workloads)
                del peers
            if train_steps:
                from .train import train_step_benchmark
                texts = [t for w in workloads for t in w.texts]  # short texts as queries, the rest as passages
                results["train"][model_name] = train_step_benchmark(folder, texts, texts[::-1], train_steps)
            if cache_batches:
                from .train import cached_step_benchmark
                # queries from the first workload (STS-B's sentences), passages from the last (SciFact's abstracts)
                results["cached"][model_name] = cached_step_benchmark(
                    folder, workloads[0].texts, workloads[-1].texts, cache_batches, cache_chunk_size, plain_max_batch)
    # measured before and after the peers: the better one is the machine's, the gap shows the load
    results["peaks_end"] = matmul_peaks()
    results["peak_gflops_start"], results["peak_gflops_end"] = (max(results[f"peaks_{when}"].values())
                                                                for when in ("start", "end"))
    results["peak_gflops"] = max(results["peak_gflops_start"], results["peak_gflops_end"])
    results["torch_mm_peak_gflops"] = max(results[f"peaks_{when}"]["torch.mm"] for when in ("start", "end"))
    results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


# -----------------------------------------------------------------------------
# Report

def _cell(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(results: dict, command: str) -> str:
    m = results["machine"]
    lines = [f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}; flags: {', '.join(m['cpu_flags'])}; "
             f"torch {m['torch']}, {m['torch_cpu_capability']}), {m['threads']} threads, load average at start "
             f"{_cell(list(m['load_average'] or []))} and end {_cell(list(m.get('load_average_end') or []))}. "
             f"fp32 matmul peak in this run: {results['peak_gflops']:.0f} GFLOP/s (the better of "
             f"{_cell(results.get('peak_gflops_start'))} before and {_cell(results.get('peak_gflops_end'))} after "
             f"the peers; torch.mm alone: {_cell(results.get('torch_mm_peak_gflops'))}).", "",
             f"Command: `{command}`", ""]
    lines += [f"Kernels the default encode chose for {model}: {choice}." for model, choice in
              results.get("kernels", {}).items()] + ([""] if results.get("kernels") else [])
    header = ("| peer | texts/s | tokens/s | × sentence-transformers | median s (min–max) | GFLOP/s (% peak) "
              "| peak extra MB | 1 − cos vs plain | STS-B ρ | set-up s |")
    for (model, workload) in dict.fromkeys((r["model"], r["workload"]) for r in results["rows"]):
        rows = [r for r in results["rows"] if r["model"] == model and r["workload"] == workload]
        lines += [f"### {model}, {workload}: {rows[0]['texts']} texts, {rows[0]['mean_tokens']:.0f} tokens on average",
                  "", header, "|---" * (header.count("|") - 1) + "|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['peer']} | skipped: {r['skipped']} |" + " |" * 8)
                continue
            lines.append(f"| {r['peer']} | {_cell(r['texts_per_s'])} | {_cell(r['tokens_per_s'])} | "
                         f"{_cell(r['vs_reference'])} | {r['median_s']:.2f} ({r['min_s']:.2f}–{r['max_s']:.2f}) | "
                         f"{r['gflops']:.0f} ({100 * r['gflops'] / results['peak_gflops']:.0f}%) | {r['peak_extra_mb']:.0f} | "
                         f"{_cell(r.get('max_one_minus_cos'), 2)} | {_cell(r['stsb_spearman'], 4)} | "
                         f"{_cell(r.get('setup_s'), 2)} |")
        lines.append("")
    if results.get("train"):
        from .train import markdown as train_markdown
        lines += [train_markdown(rows, model) for model, rows in results["train"].items()]
    if results.get("cached"):
        from .train import cached_markdown
        lines += [cached_markdown(rows, model) for model, rows in results["cached"].items()]
    return "\n".join(lines)
