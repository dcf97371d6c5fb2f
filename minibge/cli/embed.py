"""`minibge encode`, `minibge similarity` and `minibge search`: embedding texts from the shell.

    minibge encode "A man is eating food." "A man eats pasta."      # summary on stdout
    minibge encode --input texts.txt --output vectors.npy            # one text per line
    cat texts.txt | minibge encode --input - --output vectors.jsonl  # stdin works too
    torchrun --standalone --nproc_per_node 2 -m minibge encode --input texts.txt --output vectors.npy
    minibge similarity "A cat sits." "A kitten is sitting." "Stocks fell today."
    minibge search --corpus passages.txt "how do vaccines work?" --top-k 3
    minibge search --index my-index "how do vaccines work?" --format jsonl   # built by `minibge index`

Under torchrun (WORLD_SIZE > 1), `encode --input FILE --output FILE` is sharded: each rank embeds
a contiguous slice of the lines and rank 0 joins the slices, in input order (cli/shard.py).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..evaluate.search import rerank, top_k
from ..index import BACKENDS, MODES, Hit
from .args import Formatter, examples, positive_int, rerank_options
from .io import (CHUNK_TEXTS, ChunkEmbedder, UsageError, check_not_input, check_readable, check_writable, chunked,
                 embed_texts, encode_source, format_matrix, print_summary, progress, progress_setting, query_prefix,
                 read_texts, stdin_as_file, warn_blank, write_jsonl, write_npy)
from .index import print_hits, search_index
from .model import load
from .shard import encode_sharded

logger = logging.getLogger(__name__)


def add_embedding_commands(commands, verbose, model, model_only) -> None:
    """Add encode, similarity and search to the subparsers."""

    def command(name, help, description, epilog, parents=(verbose, model)):
        return commands.add_parser(name, help=help, description=description, epilog=epilog,
                                   parents=list(parents), formatter_class=Formatter)

    p = command("encode", "embed texts into vectors (.npy / .jsonl / a summary)",
                "Embed texts given as arguments or read one per line from --input. With --output "
                "FILE.npy the result is a float32 (N, D) array whose row i is input line i+1 (blank "
                "lines included, as empty texts); with FILE.jsonl one {\"text\", \"embedding\"} object "
                "per line. Without --output, a short summary goes to stdout. Big files are embedded "
                f"{CHUNK_TEXTS:,} lines at a time, so memory stays bounded. Under torchrun, each rank "
                "embeds a contiguous slice of --input and rank 0 writes --output from the slices, in "
                "input order.",
                examples('minibge encode "A man is eating food." "A man eats pasta."',
                          "minibge encode --input texts.txt --output vectors.npy",
                          "cat texts.txt | minibge encode --input - --output vectors.jsonl",
                          'minibge encode --query "what is BGE?" -m BAAI/bge-small-en-v1.5',
                          "torchrun --standalone --nproc_per_node 4 -m minibge encode --input big.txt "
                          "--output vectors.npy"))
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (or use --input)")
    p.add_argument("-i", "--input", metavar="FILE", help="UTF-8 text file, one text per line; '-' reads stdin")
    p.add_argument("-o", "--output", metavar="FILE", help="write embeddings to FILE.npy or FILE.jsonl")
    p.add_argument("--query", action="store_true",
                   help="the texts are search queries: prepend the model's query instruction")
    p.add_argument("--instruction", metavar="TEXT", help="with --query: use this instruction instead")
    p.add_argument("--no-normalize", action="store_true", help="keep raw pooled vectors (no L2 normalisation)")
    p.add_argument("--m3", action="store_true", help="-m is a BGE-M3 folder: dense vectors to --output FILE.npy, "
                   "and --sparse / --colbert outputs beside it (cli/m3.py)")
    p.add_argument("--sparse", action="store_true", help="with --m3: lexical weights to FILE.sparse.jsonl")
    p.add_argument("--colbert", action="store_true", help="with --m3: ColBERT vectors to FILE.colbert.npy "
                   "and their row offsets to FILE.colbert_offsets.npy")
    p.set_defaults(run=cmd_encode)

    p = command("similarity", "print the cosine similarity matrix of a few sentences",
                "Embed the sentences and print their pairwise cosine similarities, rounded to 4 "
                "decimals, with rows and columns labelled by the (truncated) sentences.",
                examples("minibge similarity 'A cat sits on the mat.' 'A kitten is sitting.' 'Stocks fell.'",
                          "minibge similarity --input sentences.txt"))
    p.add_argument("sentences", nargs="*", metavar="SENTENCE", help="two or more sentences (or use --input)")
    p.add_argument("-i", "--input", metavar="FILE", help="one sentence per line ('-' reads stdin); blank lines skipped")
    p.set_defaults(run=cmd_similarity)

    p = command("search", "find the passages of a corpus (or a saved index) closest to some queries",
                "Embed a corpus (one passage per line) and the queries, and print the --top-k "
                "passages for each query by cosine similarity. Queries get the model's query "
                "instruction (BGE: 'Represent this sentence for searching relevant passages: '), "
                "passages never do. With --index DIR (built by `minibge index`) only the queries "
                "are embedded, by the index's model (-m must be that model).",
                examples("minibge search --corpus passages.txt 'how do vaccines work?' 'what is BGE?'",
                          "minibge search --corpus passages.txt --queries questions.txt --top-k 10",
                          "minibge search --corpus passages.txt 'what is BGE?' --rerank RERANKER --rerank-top 100",
                          "minibge search --index my-index 'how do vaccines work?' --format jsonl"))
    p.add_argument("queries", nargs="*", metavar="QUERY", help="queries (or use --queries)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--corpus", metavar="FILE",
                        help="passages, one per line ('-' reads stdin); blank lines skipped")
    source.add_argument("--index", metavar="DIR", help="an index folder built by `minibge index`")
    p.add_argument("--backend", choices=BACKENDS, default="exact",
                   help="with --index: exact (default; flat memory), or FAISS (needs faiss-cpu): faiss-flat "
                        "(exact), faiss-hnsw / faiss-ivf (approximate)")
    p.add_argument("--mode", choices=MODES, default="dense",
                   help="with --index built by `minibge index --m3`: rank by the dense score (default), BGE-M3's "
                        "lexical matching score (sparse), or their weighted mean (sparse+dense)")
    p.add_argument("--weights", type=mode_weights, metavar="W_DENSE,W_SPARSE",
                   help="with --mode sparse+dense: the two weights, e.g. 0.4,0.2 (FlagEmbedding's "
                        "weights_for_different_modes; a third, ColBERT's, is accepted and unused); default 1,1")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text (default) or jsonl: one {query, rank, id, score, text} object per hit")
    p.add_argument("-q", "--queries", dest="queries_file", metavar="FILE", help="queries, one per line")
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="passages to show per query (default: 5)")
    p.add_argument("--no-instruction", action="store_true", help="do not prepend the query instruction")
    p.add_argument("--instruction", metavar="TEXT", help="use this query instruction instead of the model's")
    rerank_options(p, "passages")
    p.set_defaults(run=cmd_search)


def mode_weights(text: str) -> list[float]:
    """--weights 0.4,0.2 → [0.4, 0.2] (one argument: a list of numbers would swallow the queries after it)."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0.4,0.2; got {text!r}") from None


def _one_source(arguments: list[str], path: str | None, noun: str, option: str) -> None:
    if path is not None and arguments:
        raise UsageError(f"give {noun} as arguments or {option} FILE, not both")


def cmd_encode(args) -> int:
    _one_source(args.texts, args.input, "texts", "--input")
    if args.input is None and not args.texts:
        raise UsageError("nothing to encode: give texts as arguments, or --input FILE ('-' for stdin)")
    if args.instruction is not None and not args.query:
        raise UsageError("--instruction only applies with --query")
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and output.suffix.lower() not in (".npy", ".jsonl"):
        raise UsageError(f"--output must end in .npy or .jsonl, got {args.output!r}")
    check_readable(args.input, "--input")
    check_writable(args.output, "--output")
    check_not_input(args.output, "--output", {"--input": args.input})
    if (args.sparse or args.colbert) and not args.m3:
        raise UsageError("--sparse and --colbert are BGE-M3 outputs: add --m3")
    if args.m3:  # BGE-M3's outputs (cli/m3.py); one process
        from .m3 import encode_m3
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("encode --m3 runs in one process; run it without torchrun")
        if args.input == "-":
            with stdin_as_file() as copy:
                return encode_m3(args, output, copy)
        return encode_m3(args, output, args.input)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: each rank embeds a slice (cli/shard.py)
        if args.input == "-":
            raise UsageError("under torchrun, --input must be a file: stdin can be read by one process only")
        if output is None:
            raise UsageError("under torchrun, give --output FILE.npy or FILE.jsonl (rank 0 joins the ranks' "
                             "slices there); the summary on stdout is for one process")
        return encode_sharded(args, output)
    if args.input == "-":
        # stdin is copied to a file first: a .npy needs the row count before the first row, and a line
        # that is not UTF-8 is then an error before the model loads, not after everything before it is embedded
        with stdin_as_file() as copy:
            return _encode(args, output, copy)
    return _encode(args, output, args.input)


def _encode(args, output: Path | None, source: str | None) -> int:
    """encode, once the arguments are checked: texts from args.texts (source None), a file or '-'."""
    total, lines = encode_source(args, source)
    embedder, _, _ = load(args, query_instruction=args.instruction)
    prefix = query_prefix(args, embedder)
    with progress(total, "text") as bar:
        embed = ChunkEmbedder(args, embedder, prefix, bar)
        chunks = chunked(lines, CHUNK_TEXTS)
        if output is None:
            print_summary(chunks, embed, embedder.dimension, embed.normalize)
        elif output.suffix.lower() == ".npy":
            write_npy(output, chunks, embed, total, embedder.dimension)
        else:
            write_jsonl(output, chunks, embed, embedder.dimension)
    if output is not None:
        warn_blank(embed.blank)
    return 0


def cmd_similarity(args) -> int:
    _one_source(args.sentences, args.input, "sentences", "--input")
    check_readable(args.input, "--input")
    sentences = read_texts(args.input, "--input")[0] if args.input is not None else args.sentences
    if len(sentences) < 2:
        raise UsageError("give at least two sentences to compare")
    embedder, _, _ = load(args)
    vectors = embedder.encode(sentences, batch_size=args.batch_size, normalize_embeddings=True,
                              show_progress_bar=progress_setting())
    matrix = np.round(vectors @ vectors.T, 4)
    print(format_matrix(matrix, sentences))
    return 0


def cmd_search(args) -> int:
    _one_source(args.queries, args.queries_file, "queries", "--queries")
    if args.queries_file is None and not args.queries:
        raise UsageError("no queries: give them as arguments or --queries FILE")
    if args.corpus == "-" and args.queries_file == "-":
        raise UsageError("--corpus and --queries cannot both read stdin")
    if args.no_instruction and args.instruction is not None:
        raise UsageError("--no-instruction and --instruction contradict each other")
    if args.rerank and args.rerank_top < args.top_k:
        raise UsageError(f"--rerank-top {args.rerank_top} is below --top-k {args.top_k}: the reranker orders only its shortlist")
    if args.backend != "exact" and args.index is None:
        raise UsageError("--backend applies to --index only (a --corpus is searched exactly)")
    if (args.mode != "dense" or args.weights is not None) and args.index is None:
        raise UsageError("--mode and --weights apply to --index only (a --corpus is searched by dense vectors)")
    if args.weights is not None and args.mode != "sparse+dense":
        raise UsageError("--weights combine the dense and sparse scores: add --mode sparse+dense")
    if args.rerank and args.index is not None:
        raise UsageError("--rerank applies to a --corpus search (an index search returns its own top-k)")
    check_readable(args.corpus, "--corpus")
    check_readable(args.queries_file, "--queries")
    queries = read_texts(args.queries_file, "--queries")[0] if args.queries_file else args.queries
    instruction = "" if args.no_instruction else args.instruction  # None: the model's own
    if args.index is not None:
        return search_index(args, queries, instruction)
    passages, line_numbers = read_texts(args.corpus, "--corpus")

    embedder, _, _ = load(args)
    logger.info("query instruction: %r", embedder.query_instruction if instruction is None else instruction)
    q = torch.from_numpy(embedder.encode_queries(queries, instruction=instruction, batch_size=args.batch_size,
                                                 show_progress_bar=progress_setting()))
    with progress(len(passages), "passage") as bar:
        # passages are embedded a chunk at a time, as top_k asks for them: memory stays bounded
        doc_chunks = (torch.from_numpy(embed_texts(embedder, chunk, args.batch_size, True, bar))
                      for chunk in chunked(passages, CHUNK_TEXTS))
        best_scores, best_index = top_k(q, doc_chunks, max(args.top_k, args.rerank_top) if args.rerank else args.top_k)
    if args.rerank:  # retrieve, then rerank: the cross-encoder reads each query with its shortlist
        from ..reranker import load_reranker

        reranker = load_reranker(args.rerank, device=args.device or embedder.device, max_length=args.rerank_max_length)
        shortlists = [row[:args.rerank_top].tolist() for row in best_index]
        scores = rerank(reranker, queries, [[passages[j] for j in rows] for rows in shortlists], args.rerank_batch_size)
        order = [sorted(range(len(rows)), key=lambda i: -s[i])[:args.top_k] for rows, s in zip(shortlists, scores)]
        best_index = [[rows[i] for i in o] for rows, o in zip(shortlists, order)]
        best_scores = [[s[i] for i in o] for s, o in zip(scores, order)]
    else:
        best_scores, best_index = best_scores.tolist(), best_index.tolist()
    if args.format == "jsonl":  # the id of a passage is its line number, as `minibge index` numbers a text file
        print_hits(queries, [[Hit(i, rank, str(line_numbers[j]), score, j, passages[j])
                              for rank, (score, j) in enumerate(zip(s, r), start=1)]
                             for i, (s, r) in enumerate(zip(best_scores, best_index))], "jsonl")
        return 0
    for i, query in enumerate(queries):
        if i:
            print()
        print(f"query: {query}")
        for rank, (score, j) in enumerate(zip(best_scores[i], best_index[i]), start=1):
            print(f"{rank:>4}  {score:.4f}  [line {line_numbers[j]}] {passages[j]}")
    return 0
