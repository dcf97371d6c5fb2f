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
sentence-transformers, ONNX Runtime with its BERT graph optimizer. The references are optional
(`pip install minibge[bench]`); a peer whose library is missing is listed as skipped.

Useful work is counted the same for every peer, from the real (unpadded) token counts: for a text
of n tokens, each of L layers costs 2·n·(4H² + 2HI) FLOPs in its matmuls and 4·n²·H in attention.
The matmul peak is a (2048 × 2048) fp32 product timed in the same run, under the same threads.
The peers live in bench_peers.py, the contrastive training-step benchmark in bench_train.py.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import onednn
from .bench_peers import all_peers
from .config import preset
from .embedder import Embedder, load_embedder
from .eval_data import load_beir, load_sts_csv
from .evaluate import spearman
from .model import BertModel

logger = logging.getLogger(__name__)

MINILM = Path(__file__).resolve().parents[1] / "weights" / "all-MiniLM-L6-v2"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval" / "data"
RANDOM_PRESETS = {"bge-small": "bge-small-en-v1.5", "bge-base": "bge-base-en-v1.5"}
MODELS = ("minilm", *RANDOM_PRESETS)
WORKLOADS = ("stsb", "scifact")


# -----------------------------------------------------------------------------
# Workloads and checkpoints

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


def checkpoint(name: str, folder: Path) -> Path:
    """The real MiniLM folder, or a random-weight BGE-shaped embedder folder in the official layout
    (MiniLM's uncased WordPiece vocabulary is BGE's English one)."""
    if name == "minilm":
        return MINILM
    torch.manual_seed(0)
    tokenizer = load_embedder(MINILM, device="cpu").tokenizer
    Embedder(BertModel(preset(RANDOM_PRESETS[name])).eval(), tokenizer, pooling="cls", max_length=512,
             name=name).save_pretrained(folder)
    return folder


def encoder_flops(config, lengths) -> float:
    """Useful FLOPs of one forward pass over texts of these token lengths (no padding counted)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = np.asarray(lengths, dtype=np.float64)
    return float(L * (2 * n * (4 * H * H + 2 * H * I) + 4 * n * n * H).sum())


def matmul_peaks(size: int = 2048, repeats: int = 5) -> dict:
    """{library: GFLOP/s} of the best of a few fp32 (size × size) products under the current thread
    count, through torch.mm (MKL on x86 wheels) and through oneDNN (minibge/onednn.py). The "% of
    peak" column divides by the faster of the two: on some CPUs (AMD EPYC here) they differ by 2×,
    and the peak should be the machine's, not one library's."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = {"torch.mm": lambda: a @ b}
    if onednn.available(a):
        products["oneDNN"] = lambda: onednn.linear(a, b)
    with torch.inference_mode():
        return {name: 2 * size ** 3 / best_seconds(product, repeats) / 1e9 for name, product in products.items()}


# (rows, in, out) of BERT's matmuls: MiniLM's fused QKV, up and down projections; bge-base's QKV and down
BERT_MATMULS = ((4096, 384, 1152), (4096, 384, 1536), (4096, 1536, 384), (512, 768, 2304), (512, 3072, 768))


def matmul_libraries(shapes=BERT_MATMULS, repeats: int = 20) -> str:
    """A markdown table of GFLOP/s on fp32 (rows, in, out) products, best of `repeats` under the
    current thread count: F.linear (PyTorch's BLAS, MKL on x86 wheels) beside oneDNN (onednn.py).
    The measurement behind using oneDNN in the fast path and in training (docs/benchmarks.md):

        python -c "from minibge.bench import matmul_libraries; print(matmul_libraries())"
    """
    lines = [f"{torch.get_num_threads()} threads", "", "| rows × in → out | F.linear GFLOP/s | oneDNN GFLOP/s |",
             "|---|---|---|"]
    with torch.inference_mode():
        for n, d_in, d_out in shapes:
            x, w, b = torch.randn(n, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
            flops = 2 * n * d_in * d_out / 1e9
            torch_rate = flops / best_seconds(lambda: F.linear(x, w, b), repeats)
            onednn_rate = (f"{flops / best_seconds(lambda: onednn.linear(x, w, b), repeats):.0f}"
                           if onednn.available(x) else "unavailable")
            lines.append(f"| {n} × {d_in} → {d_out} | {torch_rate:.0f} | {onednn_rate} |")
    return "\n".join(lines)


def best_seconds(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    return min(_seconds(fn) for _ in range(repeats))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeakRSS:
    """Highest resident set size while the block runs, sampled every few ms from /proc (Linux)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


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
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cpu_flags": [f for f in interesting if f in flags], "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def run_benchmark(models, workload_names, rounds, scifact_docs, stsb_texts=None, data_dir=DATA_DIR,
                  speed_options=True, peer_filter=None, train_steps=0) -> dict:
    """The whole benchmark; returns {"machine", "peak_gflops", "rows", "train"}."""
    results = {"machine": machine(), "rows": [], "train": {}, "peaks_start": matmul_peaks()}
    workloads = load_workloads(Path(data_dir), workload_names, scifact_docs, stsb_texts)
    if not workloads:
        raise ValueError(f"no benchmark data under {data_dir}: expected stsbenchmark/ and/or scifact/")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            folder = checkpoint(model_name, Path(tmp) / model_name)
            embedder = load_embedder(folder, device="cpu")
            peers = [p for p in all_peers(speed_options) if peer_filter is None or peer_filter(p.name)]
            build_peers(peers, folder, embedder, workloads)
            run_rounds(peers, workloads, rounds)
            results["rows"] += summarise(model_name, embedder, peers, workloads)
            del peers
            if train_steps:
                from .bench_train import train_step_benchmark
                texts = [t for w in workloads for t in w.texts]  # short texts as queries, the rest as passages
                results["train"][model_name] = train_step_benchmark(folder, texts, texts[::-1], train_steps)
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
        from .bench_train import markdown as train_markdown
        lines += [train_markdown(rows, model) for model, rows in results["train"].items()]
    return "\n".join(lines)


def cmd_bench(args) -> int:
    """The `minibge bench` command (registered in cli.py)."""
    torch.set_num_threads(args.threads)
    command = "minibge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "minibge bench"
    wanted = [w.lower() for w in args.peer] if args.peer else None
    results = run_benchmark(args.models, args.workloads, args.rounds, args.scifact_docs, args.stsb_pairs, args.data_dir,
                            speed_options=not args.no_speed_options,
                            peer_filter=None if wanted is None else
                            lambda name: name == "sentence-transformers encode" or any(w in name.lower() for w in wanted),
                            train_steps=args.train_steps)
    report = markdown(results, command)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def add_bench_command(commands, parents) -> None:
    """Add `minibge bench` to cli.py's subparsers."""
    from .cli import _Formatter, _examples, _positive_int

    p = commands.add_parser(
        "bench", parents=parents, formatter_class=_Formatter,
        help="time minibge's encode against transformers, sentence-transformers and ONNX Runtime",
        description="Encode the STS-B test sentences and SciFact abstracts with every peer in one process, "
                    "in interleaved rounds, and print a markdown table: texts/s, tokens/s, ratio to "
                    "sentence-transformers, achieved GFLOP/s against a matmul peak measured in the same run, "
                    "peak extra memory, agreement with minibge, STS-B Spearman. The references are optional: "
                    "pip install 'minibge[bench]'.",
        epilog=_examples("minibge bench", "minibge bench --models minilm bge-small --rounds 5 --markdown bench.md",
                         "minibge bench --peer onnx --peer 'minibge fast' --workloads stsb"))
    p.add_argument("--models", nargs="+", choices=MODELS, default=["minilm"],
                   help="real all-MiniLM-L6-v2 and/or random-weight BGE shapes (default: minilm)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds per peer (default: 3)")
    p.add_argument("--threads", type=_positive_int, default=torch.get_num_threads(),
                   help="torch / ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--scifact-docs", type=_positive_int, default=1000, help="SciFact abstracts (default: 1000)")
    p.add_argument("--stsb-pairs", type=_positive_int, help="only the first N STS-B test pairs (default: all 1,379)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with stsbenchmark/ and scifact/")
    p.add_argument("--peer", action="append", metavar="TEXT",
                   help="only peers whose name contains TEXT (repeatable; sentence-transformers always runs)")
    p.add_argument("--train-steps", type=int, default=5,
                   help="contrastive training steps per side, minibge vs transformers (default: 5; 0 skips)")
    p.add_argument("--no-speed-options", action="store_true", help="skip the extra minibge.fast variants")
    p.add_argument("--markdown", metavar="FILE", help="also write the markdown report here")
    p.add_argument("-o", "--output", metavar="JSON", help="write all measurements as JSON")
    p.set_defaults(run=cmd_bench)
