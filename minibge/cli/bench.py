"""`minibge bench`: the benchmark on the command line (the benchmark itself is minibge/bench/)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..common import write_text_atomic
from ..bench.run import DATA_DIR, MODELS, WORKLOADS, markdown, run_benchmark
from .args import Formatter, examples, positive_int


def cmd_bench(args) -> int:
    """The `minibge bench` command (registered in cli/__init__.py)."""
    torch.set_num_threads(args.threads)
    command = "minibge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "minibge bench"
    wanted = [w.lower() for w in args.peer] if args.peer else None
    results = run_benchmark(args.models, args.workloads, args.rounds, args.scifact_docs, args.stsb_pairs, args.data_dir,
                            speed_options=not args.no_speed_options,
                            peer_filter=None if wanted is None else
                            lambda name: name == "sentence-transformers encode" or any(w in name.lower() for w in wanted),
                            train_steps=args.train_steps, cache_batches=args.cache_batches or (),
                            cache_chunk_size=args.cache_chunk_size, plain_max_batch=args.plain_max_batch,
                            encode=not args.training_only)
    report = markdown(results, command)
    print(report)
    if args.markdown:
        write_text_atomic(Path(args.markdown), report)
    if args.output:
        write_text_atomic(Path(args.output), json.dumps(results, indent=2, default=str) + "\n")
    return 0


def add_bench_command(commands, parents) -> None:
    """Add `minibge bench` to the `minibge` parser's subcommands (cli/__init__.py)."""
    p = commands.add_parser(
        "bench", parents=parents, formatter_class=Formatter,
        help="time minibge's encode against transformers, sentence-transformers, ONNX Runtime and OpenVINO",
        description="Encode the STS-B test sentences and SciFact abstracts with every peer in one process, "
                    "in interleaved rounds, and print a markdown table: texts/s, tokens/s, ratio to "
                    "sentence-transformers, achieved GFLOP/s against a matmul peak measured in the same run, "
                    "peak extra memory, agreement with minibge, STS-B Spearman. The references are optional: "
                    "pip install 'minibge[bench]'.",
        epilog=examples("minibge bench", "minibge bench --models minilm bge-small --rounds 5 --markdown bench.md",
                         "minibge bench --models tiny --training-only --train-steps 0 --cache-batches 32 128 512 2048",
                         "minibge bench --peer onnx --peer 'minibge fast' --workloads stsb",
                         "minibge bench --peer default --peer 'ONNX Runtime' --peer OpenVINO --rounds 3"))
    p.add_argument("--models", nargs="+", choices=MODELS, default=["minilm"],
                   help="real all-MiniLM-L6-v2, random-weight BERT-tiny (2 layers, 128 wide) and/or BGE shapes "
                        "(default: minilm)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds per peer (default: 3)")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="torch / ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--scifact-docs", type=positive_int, default=1000, help="SciFact abstracts (default: 1000)")
    p.add_argument("--stsb-pairs", type=positive_int, help="only the first N STS-B test pairs (default: all 1,379)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder with stsbenchmark/ and scifact/")
    p.add_argument("--peer", action="append", metavar="TEXT",
                   help="only peers whose name contains TEXT (repeatable; sentence-transformers always runs)")
    p.add_argument("--train-steps", type=int, default=5,
                   help="contrastive training steps per side, minibge vs transformers (default: 5; 0 skips)")
    p.add_argument("--cache-batches", type=positive_int, nargs="+", metavar="N",
                   help="also time one training step at these batch sizes (queries, group size 4), plain and with "
                        "gradient caching, with its memory (e.g. 32 128 512 2048; default: none)")
    p.add_argument("--cache-chunk-size", type=positive_int, default=32, help="gradient caching's chunk (default: 32)")
    p.add_argument("--plain-max-batch", type=positive_int, default=512,
                   help="plain (uncached) steps above this many queries are not run (default: 512)")
    p.add_argument("--training-only", action="store_true", help="skip the encode peers: the training rows only")
    p.add_argument("--no-speed-options", action="store_true", help="skip the extra minibge.fast variants")
    p.add_argument("--markdown", metavar="FILE", help="also write the markdown report here")
    p.add_argument("-o", "--output", metavar="JSON", help="write all measurements as JSON")
    p.set_defaults(run=cmd_bench)
