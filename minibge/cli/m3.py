"""BGE-M3 from the shell: `minibge finetune-m3` (unified fine-tuning with self-knowledge distillation,
registered by cli/__init__.py) and `minibge encode --m3 [--sparse] [--colbert]` (its outputs, called by
cli/embed.py's encode).

    minibge finetune-m3 -m weights/all-MiniLM-L6-v2 --train mined.jsonl --out runs/m3    # fresh heads on MiniLM
    torchrun --standalone --nproc_per_node 2 -m minibge finetune-m3 ...                  # data parallel
    minibge encode --m3 --sparse --colbert -m runs/m3 --input corpus.txt --output corpus.npy

encode --m3 writes, for input line i (blank lines included, as empty texts), row i of each output:

    corpus.npy                 dense vectors, float32 (N, H)
    corpus.sparse.jsonl        --sparse: one {"line": i + 1, "weights": {"token id": weight}} per line
    corpus.colbert.npy         --colbert: every text's ColBERT vectors one after another, float32 (Σ n_i, D)
    corpus.colbert_offsets.npy --colbert: int64 (N + 1,): text i's vectors are rows offsets[i]:offsets[i+1]

The loop's options (--epochs, --lr, --save-steps, --resume, ...) are finetune's (cli/train.py).
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..common import atomic_path
from .args import Formatter, examples
from .io import CHUNK_TEXTS, PROG, UsageError, chunked, encode_source, write_npy_header
from .train import _add_group_training_options, _train_config


def add_m3_command(commands, parents) -> None:
    """Add `finetune-m3` to cli's subparsers (parents: the shared -v option)."""
    p = commands.add_parser(
        "finetune-m3", parents=parents, formatter_class=Formatter,
        help="BGE-M3 unified fine-tuning (dense + lexical + ColBERT, self-distillation)",
        description="Fine-tune BGE-M3's three outputs together on jsonl lines {\"query\", \"pos\": [...], \"neg\": "
                    "[...]}: an InfoNCE loss per head (dense, lexical, ColBERT), one on their weighted sum "
                    "s_inter = 1·s_dense + 0.3·s_lex + 1·s_mul, and each head distilled from softmax(s_inter) "
                    "(losses.m3_loss). -m may be an M3 folder or any BERT / XLM-RoBERTa encoder (fresh heads are "
                    "added). --out receives an M3 folder: config.json, model.safetensors, colbert_linear.pt, "
                    "sparse_linear.pt, the tokenizer (minibge.BGEM3FlagModel reads it).",
        epilog=examples("minibge finetune-m3 -m weights/all-MiniLM-L6-v2 --train mined.jsonl --out runs/m3",
                         "torchrun --standalone --nproc_per_node 2 -m minibge finetune-m3 ..."))
    _add_group_training_options(p, batch_size=8, group_size=8, group_help="",
                                instruction_help="text prepended to every query (default: none)")
    p.add_argument("--temperature", type=float, default=0.02, help="τ of all three softmaxes (default: 0.02)")
    p.add_argument("--no-self-distill", action="store_true", help="the four InfoNCE losses only")
    p.set_defaults(run=cmd_finetune_m3)


def cmd_finetune_m3(args) -> int:
    from ..train import is_main_process
    from ..train.m3 import finetune_m3

    config, out = _train_config(args)
    metrics = finetune_m3(args.model, args.train, out, config, temperature=args.temperature,
                          group_size=args.group_size, query_max_length=args.query_max_length,
                          passage_max_length=args.passage_max_length, query_instruction=args.query_instruction,
                          self_distill=not args.no_self_distill, skip_bad_lines=args.skip_bad_lines,
                          resume=args.resume)
    if is_main_process():
        print(f"{PROG}: fine-tuned M3 model written to {out} (last loss {metrics.get('loss', float('nan')):.4f})",
              file=sys.stderr)
    return 0


# -----------------------------------------------------------------------------
# encode --m3

def m3_output_paths(output: Path) -> dict:
    """corpus.npy → the sibling files encode --m3 writes (module docstring)."""
    stem = output.with_suffix("")
    return {"sparse": Path(f"{stem}.sparse.jsonl"), "colbert": Path(f"{stem}.colbert.npy"),
            "offsets": Path(f"{stem}.colbert_offsets.npy")}


def encode_m3(args, output: Path | None, source: str | None) -> int:
    """`minibge encode --m3`: dense vectors to --output (.npy), and with --sparse / --colbert the lexical
    weights and ColBERT vectors to files beside it, a chunk of lines at a time; each file appears whole."""
    from .model import load_m3_model

    if output is None or output.suffix.lower() != ".npy":
        raise UsageError("encode --m3 writes several files: give --output FILE.npy (the dense vectors; the "
                         "sparse and ColBERT outputs go beside it)")
    if args.query or args.no_normalize or getattr(args, "plain", False):
        raise UsageError("encode --m3 takes none of --query, --no-normalize, --plain")
    m3, _, _ = load_m3_model(args)
    m3.model.head("sparse") if args.sparse else None      # a missing head file fails before anything is written
    m3.model.head("colbert") if args.colbert else None
    _, lines = encode_source(args, source)  # stdin arrives here as a copied file (cli/embed.py)
    paths = m3_output_paths(output)
    dense_rows, offsets, number = [], [0], 0
    with contextlib.ExitStack() as stack:  # only the files asked for; each renamed into place at the end
        tmp = {name: stack.enter_context(atomic_path(path)) for name, path in
               [("dense", output)] + [(n, paths[n]) for n in ("sparse",) if args.sparse] +
               [(n, paths[n]) for n in ("colbert", "offsets") if args.colbert]}
        sparse_file = stack.enter_context(open(tmp["sparse"], "w", encoding="utf-8")) if args.sparse else None
        raw_colbert = stack.enter_context(tempfile.TemporaryFile(dir=output.parent)) if args.colbert else None
        for chunk in chunked(lines, CHUNK_TEXTS):
            out = m3.encode(chunk, batch_size=args.batch_size, return_sparse=args.sparse,
                            return_colbert_vecs=args.colbert)
            dense_rows.append(out["dense_vecs"])
            for k in range(len(chunk)):
                number += 1
                if args.sparse:
                    sparse_file.write(json.dumps({"line": number, "weights": out["lexical_weights"][k]}) + "\n")
                if args.colbert:
                    vecs = np.ascontiguousarray(out["colbert_vecs"][k], dtype=np.float32)
                    raw_colbert.write(memoryview(vecs).cast("B"))
                    offsets.append(offsets[-1] + len(vecs))
        if number == 0:
            raise UsageError("the input is empty")
        with open(tmp["dense"], "wb") as f:
            np.save(f, np.concatenate(dense_rows).astype(np.float32))
        if args.colbert:  # the header needs the row count, known only now: header, then the rows copied after it
            with open(tmp["colbert"], "wb") as f:
                write_npy_header(f, offsets[-1], m3.model.colbert_linear.out_features)
                raw_colbert.seek(0)
                while block := raw_colbert.read(1 << 24):
                    f.write(block)
            with open(tmp["offsets"], "wb") as f:
                np.save(f, np.asarray(offsets, dtype=np.int64))
        if sparse_file is not None:
            sparse_file.close()
    written = [output] + ([paths["sparse"]] if args.sparse else []) + \
        ([paths["colbert"], paths["offsets"]] if args.colbert else [])
    print(f"{PROG}: wrote {number} texts to {', '.join(map(str, written))}", file=sys.stderr)
    return 0
