"""`minibge index` and `minibge search --index`: embed a corpus once, search it many times.

    minibge index -m weights/all-MiniLM-L6-v2 --corpus scifact/corpus.jsonl --out scifact-index
    minibge search --index scifact-index "how do vaccines work?" --top-k 10 --format jsonl
    minibge index --m3 -m runs/m3 --corpus scifact/corpus.jsonl --out m3-index       # + lexical weights
    minibge search --index m3-index "how do vaccines work?" --mode sparse+dense --weights 0.4,0.2

The folder's layout and the rules (which model may search it, the backends) are minibge/index.py's.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import index as saved_index
from .args import Formatter, examples
from .io import CliError, interactive, truncate
from .model import load, load_m3_model

logger = logging.getLogger(__name__)


def add_index_command(commands, verbose, model) -> None:
    """Add `index` to the subparsers (search --index is an option of `search`, cli/embed.py)."""
    p = commands.add_parser(
        "index", help="embed a corpus once into a folder that `search --index` queries",
        description="Embed every document of a corpus into an index folder: the vectors as a memory-mappable "
                    "vectors.npy, the ids (and texts), and a record of the model. The corpus is a text file "
                    "(one document per line, id = line number), a .jsonl(.gz) file of {\"id\" or \"_id\", "
                    "\"title\", \"text\"} objects, or a BEIR folder (corpus.jsonl); title and text are "
                    "embedded as title + ' ' + text, as `minibge eval` does. The folder is written under a "
                    "temporary name and renamed into place at the end.",
        epilog=examples("minibge index -m weights/all-MiniLM-L6-v2 --corpus passages.txt --out my-index",
                        "minibge index --corpus data/scifact --out scifact-index --faiss hnsw",
                        "minibge index --m3 -m runs/m3 --corpus data/scifact --out m3-index",
                        "minibge search --index my-index 'how do vaccines work?'"),
        parents=[verbose, model], formatter_class=Formatter)
    p.add_argument("-c", "--corpus", metavar="FILE", required=True,
                   help="documents: a text file, a .jsonl(.gz) file or a BEIR folder")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="the index folder to write")
    p.add_argument("--no-texts", action="store_true", help="store ids and vectors only, not the documents' texts")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an index")
    p.add_argument("--m3", action="store_true",
                   help="-m is a BGE-M3 folder: also store each document's lexical weights, so that `search "
                        "--index DIR --mode sparse|sparse+dense` can rank by them (ColBERT vectors are not stored)")
    p.add_argument("--faiss", action="append", choices=("hnsw", "ivf"), default=[],
                   help="also build and save this FAISS structure (needs faiss-cpu); repeatable")
    p.set_defaults(run=cmd_index)


def cmd_index(args) -> int:
    corpus = Path(args.corpus).expanduser()
    if not corpus.exists():
        raise CliError(f"--corpus not found: {corpus}")
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} exists; pass --overwrite to replace an index there")
    embedder, _, _ = load_m3_model(args) if args.m3 else load(args)
    index = saved_index.build(embedder, corpus, out, store_texts=not args.no_texts, batch_size=args.batch_size,
                              overwrite=args.overwrite, faiss=tuple(args.faiss),
                              show_progress_bar=interactive() or None)
    sparse = f", lexical weights: {index.info['sparse']['nnz']:,}" if index.sparse is not None else ""
    print(f"indexed {len(index)} documents ({index.info['dimension']} dimensions{sparse}) into {out}")
    return 0


def search_index(args, queries: list[str], instruction: str | None) -> int:
    """`minibge search --index DIR`: embed only the queries; answer from the saved vectors."""
    index = saved_index.open(Path(args.index).expanduser())
    index.check_mode(args.mode, args.backend, args.weights)  # before loading the model
    if args.model is None:  # the index's own model, unless -m says otherwise (and is then checked)
        args.model = index.info["model"]["folder"]
    if index.info["model"].get("m3"):  # built by `minibge index --m3`: the M3 model embeds the queries
        embedder, _, _ = load_m3_model(args)
    else:
        embedder, _, _ = load(args)
        logger.info("query instruction: %r", embedder.query_instruction if instruction is None else instruction)
    try:
        results = index.search(embedder, queries, k=args.top_k, backend=args.backend, instruction=instruction,
                               batch_size=args.batch_size, mode=args.mode, weights=args.weights)
    except ImportError as error:  # a FAISS backend without faiss-cpu
        raise CliError(str(error)) from None
    print_hits(queries, results, args.format)
    return 0


def print_hits(queries: list[str], results, fmt: str) -> None:
    """Results as text (a block per query) or jsonl (one object per hit)."""
    for i, (query, hits) in enumerate(zip(queries, results)):
        if fmt == "jsonl":
            for hit in hits:
                record = {"query": query, "rank": hit.rank, "id": hit.id, "score": hit.score}
                if hit.text is not None:
                    record["text"] = hit.text
                print(json.dumps(record, ensure_ascii=False))
            continue
        if i:
            print()
        print(f"query: {query}")
        for hit in hits:
            text = f" {truncate(hit.text, 200)}" if hit.text is not None else ""
            print(f"{hit.rank:>4}  {hit.score:.4f}  [{hit.id}]{text}")
