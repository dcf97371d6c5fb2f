"""A saved search index: embed a corpus once, query it many times.

    index = minibge.index.build("weights/all-MiniLM-L6-v2", "corpus.jsonl", "my-index")  # embeds the corpus
    index = minibge.index.open("my-index")                                               # reads no vectors
    hits = index.search(embedder, ["how do vaccines work?"], k=10)                      # embeds the queries only

The same from the shell: `minibge index -m MODEL --corpus FILE --out DIR`, then
`minibge search --index DIR "query" ...`.

An index is a folder:

    vectors.npy      (N, D) float32, row i = document i, L2-normalised: a plain .npy that
                     np.load(..., mmap_mode="r") maps without reading it
    ids.jsonl        document i's id as a JSON string on line i+1 ...
    ids.offsets.npy  ... and where line i+1 starts (N + 1 int64 byte offsets): an id is one seek
                     and one read, so a search never loads all ids (nor all texts)
    texts.jsonl, texts.offsets.npy   the documents' texts, the same way (left out with store_texts=False)
    index.json       what built it: the model (folder, Hub repository, sha256 of its config, tokenizer
                     and weights files; pooling, max length), the corpus file, N and D

An index built from a BGE-M3 model (an M3Embedder, `minibge index --m3`; m3.py) also holds each
document's lexical weights, as one sparse (N, V) matrix in CSR form, V the vocabulary:

    sparse.indptr.npy   (N + 1,) int64: document i's weights are entries indptr[i]:indptr[i+1] ...
    sparse.indices.npy  (nnz,) int32 token ids, ascending within a document ...
    sparse.values.npy   (nnz,) float32 their weights (> 0; the special tokens are already dropped)

and index.json says so ("sparse": {"vocab_size": V, "nnz": nnz}; the model record has "m3": true,
and its sha256 covers the two head files too). search(mode=...) then ranks by one of

    dense           e_q · e_d                                    (every index)
    sparse          s_lex = Σ_{t in both} w_q(t) · w_d(t)        (the lexical matching score)
    sparse+dense    (w2·s_lex + w1·s_dense) / (w1 + w2)          (m3.combine_scores, weights [w1, w2])

the very numbers BGEM3FlagModel.compute_score gives for the same (query, document) pair. ColBERT
vectors are not stored: they take a vector per token (SciFact's 5,183 abstracts at D = 384 are
~2.3 GB; BGE-M3's D = 1024 is 2.7 times that), where the dense vector and the sparse weights take
one vector and a few hundred numbers per document. Rerank a shortlist with compute_score for it.

The corpus file is read line by line (common.iter_lines), in one of three forms:

    text     one document per line; blank lines are skipped; the id is the line number ("17"), as
             `minibge search --corpus` numbers its passages
    jsonl    one JSON object per line with "id" or "_id", and "text" and/or "title": a BEIR
             corpus.jsonl(.gz) is one. The text embedded is title + " " + text, stripped, as MTEB
             and `minibge eval --task scifact` embed a BEIR document (evaluate.data.document_text)
    BEIR     a folder holding corpus.jsonl or corpus.jsonl.gz

Exact choices:
- The corpus is read twice: a first pass counts the documents (the .npy shape, the progress bar,
  a bad line reported before any embedding), the second embeds CHUNK_TEXTS documents at a time,
  straight into the memory-mapped vectors.npy. Memory: one chunk, plus the set of ids seen (a
  duplicate id is an error: a search result must name one document).
- Documents get no instruction; queries get the model's retrieval instruction (Embedder.encode_queries).
- The folder is written under a temporary name beside DIR and renamed onto it at the end; a run that
  fails leaves nothing. An existing index is replaced only with overwrite=True, and anything else at
  DIR never is.
- The lexical scores are computed SEARCH_ROWS documents at a time, like the dense ones, from plain
  reads of the CSR files: per chunk, each stored weight whose token is among the queries' tokens is
  multiplied by the query's weight and added to its document's score (float64). The files are
  untrusted: their shapes and dtypes are checked when the index opens, indptr (monotone, 0 to nnz)
  at the first lexical search, and each chunk's token ids (in [0, V)) and weights (finite, ≥ 0)
  when it is read.
- Searching with a model other than the one that built the index is refused: the sha256 of the model's
  files must match the record (or pooling/dimension differ), since another model's query vectors live
  in another space and would return confident nonsense.
- Backends: "exact" (default) is evaluate.search.top_k over vectors.npy read chunk by chunk (flat
  memory, any N); "faiss-flat" is FAISS's exact inner-product index (equal results, all vectors in
  memory); "faiss-hnsw" and "faiss-ivf" are approximate (their recall@10 against exact is measured in
  docs/usage.md). FAISS structures are built in memory at the first search, unless `build(..., faiss=
  ("hnsw",))` saved them in the folder. faiss-cpu is an optional extra.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import common, hub
from .embedder import BATCH_SIZE
from .evaluate.data import document_text
from .evaluate.search import npy_chunks, npy_header, top_k, top_k_of_scores
from .m3 import HEAD_FILES, M3Embedder, check_mode_weights, combine_scores

logger = logging.getLogger(__name__)

FORMAT = "minibge-index"
VERSION = 1
INDEX_FILE, VECTORS_FILE = "index.json", "vectors.npy"
CHUNK_TEXTS = 10_000  # documents embedded at a time: the same chunks as `minibge search --corpus`
SEARCH_ROWS = 16_384  # vectors scored at a time by the exact backend: (Q, 16384) scores
BACKENDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf")
MODES = ("dense", "sparse", "sparse+dense")  # the M3 scores an index can rank by (ColBERT's are not stored)
SPARSE_FILES = {"indptr": ("sparse.indptr.npy", "<i8"), "indices": ("sparse.indices.npy", "<i4"),
                "values": ("sparse.values.npy", "<f4")}
MODEL_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
               "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ---------------------------------------------------------------- the model's record
def model_sha256(folder, m3: bool = False) -> str:
    """sha256 over the files that decide a model's vectors: config, tokenizer, weights (shards too),
    and with m3 the two head files (the sparse head decides the stored lexical weights).

    Each file enters as its name, its size and its bytes, in sorted order, so renaming the folder
    keeps the hash and changing any of those files changes it."""
    folder = Path(folder)
    files = MODEL_FILES + (tuple(HEAD_FILES.values()) if m3 else ())
    names = [name for name in files if (folder / name).is_file()]
    index = common.read_json(folder / "model.safetensors.index.json")
    if index is not None and not (folder / "model.safetensors").is_file():
        names += sorted(set(index.get("weight_map", {}).values()))
    digest = hashlib.sha256()
    for name in sorted(set(names)):
        path = folder / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with builtins.open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def model_folder(embedder) -> Path:
    """The folder an Embedder was loaded from: `embedder.folder` if it has one, else its name
    (load_embedder names an embedder by the folder or Hub id it was given)."""
    folder = getattr(embedder, "folder", None)
    if folder is None:
        try:
            folder = hub.resolve_model_path(embedder.name, download_if_missing=False)
        except (hub.HubError, OSError, ValueError) as error:
            raise ValueError(f"cannot tell which folder the embedder {embedder.name!r} was loaded from "
                             f"({error}); load it with minibge.load_embedder(folder)") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"cannot tell which folder the embedder {embedder.name!r} was loaded from; "
                         "load it with minibge.load_embedder(folder)")
    return folder


def model_record(embedder, m3: bool = False) -> dict:
    """What index.json says about the model that embedded the documents (for an M3 model, its
    dense Embedder, M3Embedder.embedder, with m3=True)."""
    folder = model_folder(embedder)
    record = {"name": folder.name, "folder": str(folder.resolve()), "repository": hub.recorded_source(folder),
              "sha256": model_sha256(folder, m3), "pooling": embedder.pooling, "max_length": embedder.max_length,
              "dimension": embedder.dimension, "normalized": True}
    return {**record, "m3": True} if m3 else record


# ---------------------------------------------------------------- reading a corpus
def corpus_format(path) -> tuple[Path, str]:
    """(the file to read, "text" or "jsonl") for a corpus path: a BEIR folder, .jsonl(.gz), else text."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (path / n).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} is a folder without corpus.jsonl or corpus.jsonl.gz (BEIR's layout)")
        return found, "jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    return path, "jsonl" if ".jsonl" in suffixes else "text"


def iter_corpus(path) -> Iterator[tuple[str, str]]:
    """(id, text) for every document of a corpus file or BEIR folder (see the module docstring)."""
    path, kind = corpus_format(path)
    for number, line in common.iter_lines(path, skip_blank=True):
        if kind == "text":
            yield str(number), line
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise common.LineError(str(path), number, f"bad JSON ({e.msg})") from None
        doc_id = doc.get("_id", doc.get("id")) if isinstance(doc, dict) else None
        if doc_id is None or isinstance(doc_id, (dict, list, bool)):
            raise common.LineError(str(path), number, 'expected a JSON object with an "id" (or "_id") string')
        if not isinstance(doc.get("text", ""), (str, type(None))) or not isinstance(doc.get("title", ""), (str, type(None))):
            raise common.LineError(str(path), number, '"text" and "title" must be strings')
        yield str(doc_id), document_text(doc)


# ---------------------------------------------------------------- files of ids and texts
def _write_lines(values, handle, offsets: list[int]) -> None:
    """Each value as one JSON line, noting where each line starts."""
    for value in values:
        offsets.append(handle.tell())
        handle.write(json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n")


class _Lines:
    """Line i of a .jsonl file with a .offsets.npy beside it: one seek, one read."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets = np.load(path.with_suffix(".offsets.npy"), mmap_mode="r")  # (N + 1,) int64

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, rows) -> list[str]:
        out = []
        with builtins.open(self.path, "rb") as f:
            for row in rows:
                start, end = int(self.offsets[row]), int(self.offsets[row + 1])
                f.seek(start)
                out.append(json.loads(f.read(end - start)))
        return out


def check_index_destination(out: Path, overwrite: bool) -> None:
    """An existing `out` may be replaced only if it is an index and overwrite is set (common.atomic_folder
    then swaps it whole: at every moment `out` is a whole index or absent)."""
    if out.is_symlink():
        raise ValueError(f"{out} is a symlink; give the index a real folder name")
    if out.exists():
        if not (out / INDEX_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not a minibge index; choose another --out")
        if not overwrite:
            raise FileExistsError(f"index {out} exists; pass overwrite=True (--overwrite) to replace it")


# ---------------------------------------------------------------- building
def build(model, corpus, out, *, store_texts: bool = True, batch_size: int = BATCH_SIZE, overwrite: bool = False,
          faiss: tuple[str, ...] = (), show_progress_bar: bool | None = None, m3: bool = False,
          **load_kwargs) -> "Index":
    """Embed every document of `corpus` (a text/jsonl file or a BEIR folder) with `model` (a folder,
    a Hub id, a loaded Embedder or M3Embedder) into the index folder `out`; returns the opened Index.

    m3: `model` is a BGE-M3 folder (load_m3): the index holds its dense vectors and lexical weights
    (an M3Embedder given as `model` does this too). faiss: FAISS structures to build and save beside
    the vectors ("hnsw", "ivf"); load_kwargs go to load_embedder / load_m3 (device, dtype, max_length, ...)."""
    from .embedder import load_embedder
    from .m3 import load_m3

    loaded = hasattr(model, "encode_corpus") or isinstance(model, M3Embedder)
    if loaded and load_kwargs:
        raise ValueError(f"{sorted(load_kwargs)} are for loading a model; this embedder is already loaded")
    if m3 and loaded and not isinstance(model, M3Embedder):
        raise ValueError("m3=True needs a BGE-M3 folder or an M3Embedder (minibge.load_m3), not a plain embedder")
    if not loaded:
        model = (load_m3 if m3 else load_embedder)(model, **load_kwargs)
    m3 = isinstance(model, M3Embedder)
    if m3:
        model.model.head("sparse")  # a folder without sparse_linear.pt fails here, before any embedding
    embedder = model.embedder if m3 else model  # the dense side: pooling, dimension, the model's folder
    record = model_record(embedder, m3)
    out = Path(out)
    corpus_path, kind = corpus_format(corpus)
    for name in faiss:
        if f"faiss-{name}" not in BACKENDS[2:]:
            raise ValueError(f"faiss structures to save are 'hnsw' and 'ivf', got {name!r}")
    total, seen = 0, set()
    for doc_id, _ in iter_corpus(corpus_path):  # first pass: count, and check ids and lines
        if doc_id in seen:
            raise ValueError(f"{corpus_path}: duplicate document id {doc_id!r}")
        seen.add(doc_id)
        total += 1
    del seen
    if total == 0:
        raise ValueError(f"{corpus_path} has no documents")

    bar = _progress_bar(total, show_progress_bar)
    check_index_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_folder(out, replace=True) as folder:
        vectors = np.lib.format.open_memmap(folder / VECTORS_FILE, mode="w+", dtype=np.float32,
                                            shape=(total, embedder.dimension))  # (N, D)
        id_offsets, text_offsets, row = [], [], 0
        sparse = _SparseWriter(folder) if m3 else None
        with builtins.open(folder / "ids.jsonl", "wb") as ids, \
                (builtins.open(folder / "texts.jsonl", "wb") if store_texts else contextlib.nullcontext()) as texts:
            for chunk in common.chunked(iter_corpus(corpus_path), CHUNK_TEXTS):
                chunk_ids, chunk_texts = zip(*chunk)
                if m3:  # dense vectors and lexical weights of one forward pass (M3Embedder.encode), a chunk at a time
                    output = model.encode(list(chunk_texts), batch_size=batch_size, return_sparse=True,
                                          show_progress_bar=False)
                    vectors[row:row + len(chunk)] = output["dense_vecs"]  # (n, D), unit length
                    sparse.add(output["lexical_weights"])
                    if bar is not None:
                        bar.update(len(chunk))
                else:
                    # batch by batch, as encode_corpus embeds them (no instruction, unit length), so that
                    # the progress bar moves with every batch and each one lands in its rows at once
                    for indices, batch in embedder.iter_batches(list(chunk_texts), batch_size=batch_size,
                                                                normalize_embeddings=True, show_progress_bar=False):
                        vectors[row + indices] = batch.cpu().numpy()  # (b, D) into rows in input order
                        if bar is not None:
                            bar.update(len(indices))
                _write_lines(chunk_ids, ids, id_offsets)
                if store_texts:
                    _write_lines(chunk_texts, texts, text_offsets)
                row += len(chunk)
            if row != total:
                raise ValueError(f"{corpus_path} changed while it was read ({total} documents, then {row})")
            id_offsets.append(ids.tell())
            if store_texts:
                text_offsets.append(texts.tell())
        vectors.flush()
        del vectors  # closes the memory map
        np.save(folder / "ids.offsets.npy", np.asarray(id_offsets, dtype=np.int64))
        if store_texts:
            np.save(folder / "texts.offsets.npy", np.asarray(text_offsets, dtype=np.int64))
        info = {"format": FORMAT, "version": VERSION, "count": total, "dimension": embedder.dimension,
                "texts": store_texts, "model": record,
                "corpus": {"path": str(corpus_path.resolve()), "format": kind}}
        if m3:
            info["sparse"] = {"vocab_size": model.model.config.vocab_size, "nnz": sparse.finish()}
        (folder / INDEX_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        staged = Index(folder)
        for name in faiss:
            _faiss_module().write_index(staged.faiss_index(f"faiss-{name}"), str(folder / f"faiss-{name}.faiss"))
    if bar is not None:
        bar.close()
    logger.info("indexed %d documents of %s into %s", total, corpus_path, out)
    return Index(out)


def _progress_bar(total: int, show: bool | None):
    if show is None:
        show = logger.getEffectiveLevel() <= logging.INFO
    if not show:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="doc", desc="Indexing")


# ---------------------------------------------------------------- lexical weights (M3)
class _SparseWriter:
    """Appends documents' {"token id": weight} dicts to the CSR files: token ids and weights go to
    two raw files as they come (their count is known only at the end), then each becomes a .npy
    (the header, then the raw bytes copied after it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.indptr = [0]
        self.raw = {name: builtins.open(folder / f"{SPARSE_FILES[name][0]}.part", "wb") for name in ("indices", "values")}

    def add(self, weights: list[dict]) -> None:
        for item in weights:
            ids = sorted(int(t) for t in item)
            self.raw["indices"].write(np.asarray(ids, dtype=SPARSE_FILES["indices"][1]).tobytes())
            self.raw["values"].write(np.asarray([item[str(t)] for t in ids], dtype=SPARSE_FILES["values"][1]).tobytes())
            self.indptr.append(self.indptr[-1] + len(ids))

    def finish(self) -> int:
        """Write the three .npy files; returns nnz."""
        nnz = self.indptr[-1]
        np.save(self.folder / SPARSE_FILES["indptr"][0], np.asarray(self.indptr, dtype=SPARSE_FILES["indptr"][1]))
        for name, raw in self.raw.items():
            raw.close()
            filename, dtype = SPARSE_FILES[name]
            with builtins.open(self.folder / filename, "wb") as f, builtins.open(raw.name, "rb") as part:
                np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": (nnz,)})
                while block := part.read(1 << 24):
                    f.write(block)
            Path(raw.name).unlink()
        return nnz


class SparseRows:
    """The lexical weights of a saved M3 index, read as untrusted (module docstring): the CSR files'
    shapes and dtypes are checked here, indptr at first use, the entries chunk by chunk."""

    def __init__(self, path: Path, count: int, info: dict):
        self.path, self.count = path, count
        vocab, nnz = info.get("vocab_size"), info.get("nnz")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (vocab, nnz)):
            raise ValueError(f"{path / INDEX_FILE}: \"sparse\" must hold the integers vocab_size and nnz")
        self.vocab_size, self.nnz = vocab, nnz
        self.offsets = {}
        for name, (filename, dtype) in SPARSE_FILES.items():
            file = path / filename
            if file.is_symlink() or not file.is_file():
                raise ValueError(f"{file} is missing (or not a regular file); this M3 index is incomplete, rebuild it")
            shape, found, offset = npy_header(file)
            want = (count + 1,) if name == "indptr" else (nnz,)
            if shape != want or found != np.dtype(dtype):
                raise ValueError(f"{file} holds {found} {shape}, but {INDEX_FILE} says {np.dtype(dtype)} {want}")
            if file.stat().st_size != offset + np.prod(want, dtype=np.int64) * np.dtype(dtype).itemsize:
                raise ValueError(f"{file} is {file.stat().st_size} bytes, not what its header says (truncated?)")
            self.offsets[name] = offset
        self._indptr = None

    @property
    def indptr(self) -> np.ndarray:
        """(N + 1,) int64, checked: starts at 0, never decreases, ends at nnz."""
        if self._indptr is None:
            indptr = np.load(self.path / SPARSE_FILES["indptr"][0], allow_pickle=False)
            if indptr[0] != 0 or indptr[-1] != self.nnz or (np.diff(indptr) < 0).any():
                raise ValueError(f"{self.path / SPARSE_FILES['indptr'][0]}: row pointers must rise from 0 to "
                                 f"nnz = {self.nnz} (a damaged or foreign file)")
            self._indptr = indptr
        return self._indptr

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Entries start:stop of indices or values, by a plain read (no memory map: see npy_chunks)."""
        filename, dtype = SPARSE_FILES[name]
        with builtins.open(self.path / filename, "rb") as f:
            f.seek(self.offsets[name] + start * np.dtype(dtype).itemsize)
            out = np.fromfile(f, dtype=dtype, count=stop - start)
        if len(out) != stop - start:
            raise ValueError(f"{self.path / filename} ends early (truncated?)")
        return out

    def scores(self, query_weights: list[dict], rows: int = SEARCH_ROWS) -> Iterator[torch.Tensor]:
        """s_lex of every query against every document: (Q, n) float64 tensors, `rows` documents at a time."""
        # the queries' tokens only: a (V,) lookup to a compact column, and their weights (u, Q)
        tokens = sorted({int(t) for item in query_weights for t in item})
        if tokens and not (0 <= tokens[0] and tokens[-1] < self.vocab_size):
            raise ValueError(f"query token ids must lie in [0, {self.vocab_size}): is this the index's model?")
        column = np.full(self.vocab_size, -1, dtype=np.int64)
        column[tokens] = np.arange(len(tokens))
        query = np.zeros((len(tokens), len(query_weights)))                        # (u, Q) float64
        for j, item in enumerate(query_weights):
            for t, w in item.items():
                query[column[int(t)], j] = w
        indptr = self.indptr
        for start in range(0, self.count, rows):
            stop = min(start + rows, self.count)
            a, b = int(indptr[start]), int(indptr[stop])
            ids, values = self._read("indices", a, b), self._read("values", a, b)  # (e,) each
            if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise ValueError(f"{self.path / SPARSE_FILES['indices'][0]}: a token id outside [0, {self.vocab_size})")
            if not np.isfinite(values).all() or (values < 0).any():
                raise ValueError(f"{self.path / SPARSE_FILES['values'][0]}: weights must be finite and ≥ 0")
            document = np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1]))  # (e,) each entry's row
            cols = column[ids]
            shared = cols >= 0                                                      # entries whose token a query has
            products = values[shared, None].astype(np.float64) * query[cols[shared]]  # (e', Q): w_d(t)·w_q(t)
            scores = torch.zeros(stop - start, len(query_weights), dtype=torch.float64)
            scores.index_add_(0, torch.from_numpy(document[shared]), torch.from_numpy(products))  # (n, Q)
            yield scores.T                                                          # (Q, n)


# ---------------------------------------------------------------- searching
@dataclass
class Hit:
    """One result: the query's position, rank (1 = best), the document's id, score, row and text (or None)."""
    query: int
    rank: int
    id: str
    score: float
    row: int
    text: str | None = None


def _faiss_module():
    try:
        import faiss
    except ImportError:
        raise ImportError("the faiss backends need faiss-cpu: pip install 'minibge[faiss]'") from None
    return faiss


class Index:
    """An index folder, opened: nothing but index.json and the offsets are read until a search."""

    def __init__(self, path):
        self.path = Path(path)
        info = common.read_json(self.path / INDEX_FILE)
        if info is None:
            raise FileNotFoundError(f"{self.path} is not a minibge index (no {INDEX_FILE}); build one with `minibge index`")
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ValueError(f"{self.path / INDEX_FILE}: not a version-{VERSION} minibge index")
        self.info = info
        shape, dtype, _ = npy_header(self.path / VECTORS_FILE)
        if shape != (info["count"], info["dimension"]) or dtype != np.dtype("<f4"):
            raise ValueError(f"{self.path / VECTORS_FILE} holds {dtype} {shape}, but {INDEX_FILE} says "
                             f"float32 ({info['count']}, {info['dimension']})")
        self.ids = _Lines(self.path / "ids.jsonl")
        self.texts = _Lines(self.path / "texts.jsonl") if info.get("texts") else None
        self.sparse = SparseRows(self.path, info["count"], info["sparse"]) if "sparse" in info else None
        self._faiss = {}

    def __len__(self) -> int:
        return self.info["count"]

    def __repr__(self):
        model = self.info["model"]
        sparse = ", sparse" if self.sparse is not None else ""
        return f"Index({str(self.path)!r}, {len(self)} x {self.info['dimension']}{sparse}, model={model['name']!r})"

    @property
    def vectors(self) -> np.ndarray:
        """The (N, D) float32 vectors, memory-mapped read-only."""
        return np.load(self.path / VECTORS_FILE, mmap_mode="r")

    def check_model(self, embedder) -> None:
        """Refuse an embedder other than the one that built the index (ValueError saying which is which)."""
        record = self.info["model"]
        if isinstance(embedder, M3Embedder):
            embedder = embedder.embedder  # its dense side: pooling, dimension, folder
        folder = model_folder(embedder)
        mismatch = []
        if model_sha256(folder, bool(record.get("m3"))) != record["sha256"]:
            mismatch.append("its files' sha256")
        for key, ours in (("pooling", embedder.pooling), ("dimension", embedder.dimension)):
            if record.get(key) != ours:
                mismatch.append(f"{key} {ours!r} vs {record.get(key)!r}")
        if mismatch:
            raise ValueError(f"index {self.path} was built with model {record['name']} ({record['folder']}), "
                             f"not {folder.name} ({folder.resolve()}): {', '.join(mismatch)} differ; search it "
                             f"with -m {record['folder']}, or rebuild it with `minibge index -m {folder}`")

    def search_vectors(self, queries, k: int = 10, backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """Best-first (scores, rows), both (Q, min(k, N)), for (Q, D) query vectors (unit length)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32)).reshape(-1, self.info["dimension"])  # (Q, D)
        if backend == "exact":
            scores, rows = top_k(q, npy_chunks(self.path / VECTORS_FILE, SEARCH_ROWS), k)
            return scores.numpy(), rows.numpy()
        scores, rows = self.faiss_index(backend).search(np.ascontiguousarray(q.numpy()), min(k, len(self)))
        return scores, rows

    def faiss_index(self, backend: str):
        """The FAISS structure for a backend: the saved one, else built now (and kept for the next search)."""
        if backend in self._faiss:
            return self._faiss[backend]
        faiss = _faiss_module()
        saved = self.path / f"{backend}.faiss"
        if saved.is_file():
            structure = faiss.read_index(str(saved))
        else:
            structure = _build_faiss(faiss, backend, self.path / VECTORS_FILE, self.info["dimension"], len(self))
        self._faiss[backend] = structure
        return structure

    def search(self, embedder, queries: list[str], k: int = 10, backend: str = "exact",
               instruction: str | None = None, batch_size: int = BATCH_SIZE, mode: str = "dense",
               weights=None) -> list[list[Hit]]:
        """Embed the queries (with the model's retrieval instruction, or `instruction`; "" for none)
        and return their top k documents, best first: one list of Hits per query.

        mode "sparse" and "sparse+dense" need an index built from an M3 model and that model's
        M3Embedder (load_m3); weights are FlagEmbedding's weights_for_different_modes, [w_dense,
        w_sparse] or [w_dense, w_sparse, w_colbert] (the last unused here), default [1, 1].
        An M3Embedder's queries get no instruction unless `instruction` gives one (BGE-M3 has none)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of str; wrap one query in a list")
        self.check_mode(mode, backend, weights)
        if mode != "dense" and not isinstance(embedder, M3Embedder):
            raise ValueError(f"mode {mode!r} needs the lexical weights of the queries: search with the M3 model "
                             f"(minibge.load_m3({self.info['model']['folder']!r})), not {type(embedder).__name__}")
        self.check_model(embedder)
        if isinstance(embedder, M3Embedder):
            texts = [(instruction or "") + query for query in queries]
            out = embedder.encode(texts, batch_size=batch_size, return_sparse=mode != "dense", show_progress_bar=False)
            q, lexical = out["dense_vecs"], out["lexical_weights"]  # (Q, D), [{"token id": w}] or None
        else:
            q = embedder.encode_queries(list(queries), instruction=instruction, batch_size=batch_size,
                                        normalize_embeddings=True, show_progress_bar=False)  # (Q, D)
        if mode == "dense":
            scores, rows = self.search_vectors(q, k, backend)
        else:
            scores, rows = self.search_lexical(q, lexical, k, mode, weights)
        return self.hits(scores, rows)

    def check_mode(self, mode: str, backend: str = "exact", weights=None) -> None:
        """ValueError unless this index can rank by `mode` with `backend` and `weights`."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "dense" and self.sparse is None:
            raise ValueError(f"index {self.path} holds dense vectors only, so it cannot rank by mode {mode!r}; "
                             "build it from a BGE-M3 model with a sparse head (`minibge index --m3`)")
        if mode != "dense" and backend != "exact":
            raise ValueError(f"backend {backend!r} searches dense vectors only; mode {mode!r} needs backend 'exact'")
        if weights is not None and mode != "sparse+dense":
            raise ValueError(f"weights combine the dense and sparse scores: they apply to mode 'sparse+dense' only, "
                             f"not {mode!r}")
        mode_weights(weights)

    def search_lexical(self, query_vectors, query_weights: list[dict], k: int = 10, mode: str = "sparse",
                       weights=None) -> tuple[np.ndarray, np.ndarray]:
        """Best-first (scores, rows), both (Q, min(k, N)), by the lexical ("sparse") or the combined
        ("sparse+dense") score, for M3 query outputs: (Q, D) dense vectors, Q {"token id": weight} dicts."""
        self.check_mode(mode, "exact", weights)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q = torch.as_tensor(np.asarray(query_vectors, dtype=np.float32)).reshape(-1, self.info["dimension"])  # (Q, D)
        if len(query_weights) != len(q):
            raise ValueError(f"{len(q)} query vectors but {len(query_weights)} lexical weight dicts")
        w = mode_weights(weights)

        def chunks():  # the same SEARCH_ROWS documents of both files at a time
            dense = npy_chunks(self.path / VECTORS_FILE, SEARCH_ROWS)
            for lexical, vectors in zip(self.sparse.scores(query_weights, SEARCH_ROWS), dense):
                if mode == "sparse":
                    yield lexical                                                    # (Q, n)
                    continue
                dense_scores = (q @ vectors.T).double()                               # (Q, n)
                combined = combine_scores(dense_scores.numpy(), lexical.numpy(), np.zeros(lexical.shape), w)
                yield torch.as_tensor(combined["sparse+dense"], dtype=torch.float64)  # (Q, n)

        scores, rows = top_k_of_scores(chunks(), k, len(q), dtype=torch.float64)
        return scores.numpy(), rows.numpy()

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        """Hits from (scores, rows), with each document's id and, when stored, text."""
        out = []
        for i, (query_scores, query_rows) in enumerate(zip(scores, rows)):
            keep = [(float(s), int(r)) for s, r in zip(query_scores, query_rows) if r >= 0]  # FAISS pads with -1
            found = [r for _, r in keep]
            ids = self.ids[found]
            texts = self.texts[found] if self.texts is not None else [None] * len(found)
            out.append([Hit(i, rank, doc_id, score, row, text)
                        for rank, ((score, row), doc_id, text) in enumerate(zip(keep, ids, texts), start=1)])
        return out


def mode_weights(weights) -> list[float]:
    """FlagEmbedding's weights_for_different_modes for an index: [w_dense, w_sparse(, w_colbert)], default
    [1, 1]; ColBERT's weight is unused (an index holds no ColBERT vectors) and counts as 0."""
    if weights is None:
        return [1.0, 1.0, 0.0]
    if not isinstance(weights, (list, tuple)) or len(weights) not in (2, 3):
        raise ValueError(f"weights must be [w_dense, w_sparse] (or FlagEmbedding's three, [w_dense, w_sparse, "
                         f"w_colbert]), got {weights!r}")
    return list(check_mode_weights([*weights[:2], 0.0]))


def _build_faiss(faiss, backend: str, vectors_path: Path, dim: int, n: int):
    """A FAISS inner-product structure over the vectors, filled chunk by chunk."""
    if backend == "faiss-flat":
        structure = faiss.IndexFlatIP(dim)
    elif backend == "faiss-hnsw":
        structure = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)  # 32 links per node
        structure.hnsw.efConstruction = 200
        structure.hnsw.efSearch = 128
    else:  # faiss-ivf: about 4 sqrt(N) lists, each query visits 1/8 of them (at least 8)
        nlist = max(1, min(int(4 * n ** 0.5), n // 39))  # FAISS wants >= 39 training points per list
        structure = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.load(vectors_path, mmap_mode="r")
        step = max(1, n // (256 * nlist))  # an even sample of at most 256 points per list
        structure.train(np.ascontiguousarray(sample[::step]))
        structure.nprobe = min(nlist, max(8, nlist // 8))
    logger.info("building %s over %d vectors in memory", backend, n)
    for chunk in npy_chunks(vectors_path, SEARCH_ROWS):
        structure.add(np.ascontiguousarray(chunk.numpy()))
    return structure


def open(path) -> Index:  # noqa: A001 - minibge.index.open, as the issue names it
    """Open an index folder built by `build` (or `minibge index`)."""
    return Index(path)
