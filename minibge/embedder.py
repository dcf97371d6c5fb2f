"""Text in, embeddings out: the one place where strings meet tensors.

    embedder = minibge.load_embedder("BAAI/bge-small-en-v1.5")   # or a local folder
    q = embedder.encode_queries(["what is BGE?"])                # instruction added, (1, 384)
    p = embedder.encode_corpus(["BGE is an embedding model."])   # no instruction,   (1, 384)
    scores = q @ p.T                                             # cosine similarities

The conventions are sentence-transformers' and FlagEmbedding's, so code written for either
ports over: a single string gives a 1-D vector, a list gives (N, D) numpy float32; batches
are sorted by length, longest first (little padding, and an out-of-memory error surfaces
on the first batch rather than the last), and the input order is restored at the end.

What a checkpoint folder decides (sentence-transformers files take precedence when present):
    pooling      1_Pooling/config.json ("cls" / "mean"), else CLS, which every BGE model uses
    max_length   sentence_bert_config.json max_seq_length (256 for all-MiniLM-L6-v2), else 512
    instruction  config_sentence_transformers.json prompts["query"], else BGE's by model name
Texts longer than max_length tokens are truncated (the tail is dropped, [SEP] kept), never an error.
"""
import json
import logging
import numbers
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .common import atomic_folder, read_json, require_native_bf16
from .fast import encoder as fast_path
from .hub import resolve_model_path
from .model import POOLING, l2_normalize
from .quantization import PRECISIONS, quantize_embeddings
from .similarity import SIMILARITY_FUNCTIONS, similarity, similarity_pairwise
from .tokenizer import Tokenizer, check_texts
from .weights import check_side_files, load_model
from .weights import save_pretrained as save_model

logger = logging.getLogger(__name__)

# FlagEmbedding's retrieval instructions; added to short queries only, never to passages
INSTRUCTION_EN = "Represent this sentence for searching relevant passages: "
INSTRUCTION_ZH = "为这个句子生成表示以用于检索相关文章："
PROGRESS_BAR_MIN_TEXTS = 1024  # show_progress_bar=None shows a bar from this many texts on
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")  # what encode(output_value=) can return
# encode's texts per batch at most. Not sentence-transformers' 32 but FlagEmbedding's 256 for BGE: a
# batch costs its tokens, not its texts (the fast path packs them, so more texts add no padding),
# and the token budget (Embedder.max_tokens) is what bounds memory; a 32-text cap only made short
# texts' matmuls small (docs/benchmarks.md, "encode's batch of 256 texts").
BATCH_SIZE = 256
MAX_TOKENS = 4096  # Embedder.max_tokens' default: real tokens per batch at most


def read_pooling_mode(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder declares, in the 3.x or the 6.x spelling."""
    pooling_dir = "1_Pooling"
    for module in read_json(folder / "modules.json") or []:
        if module.get("type", "").endswith("Pooling"):
            pooling_dir = module.get("path") or pooling_dir
    config = read_json(folder / pooling_dir / "config.json")
    if config is None:
        return None
    mode = config.get("pooling_mode")  # 6.x
    if mode is None:
        mode = next((m for m in ("cls", "mean") if config.get(f"pooling_mode_{m}_token{'s' if m == 'mean' else ''}")), None)
    if mode not in POOLING:
        raise ValueError(f"{folder / pooling_dir / 'config.json'} asks for pooling {mode or config!r}; "
                         f"minibge supports {sorted(POOLING)}")
    return mode


def default_query_instruction(folder: Path) -> str | None:
    prompts = (read_json(folder / "config_sentence_transformers.json") or {}).get("prompts") or {}
    if "query" in prompts:  # an explicit "" means "no instruction", e.g. a model saved without one
        return prompts["query"] or None
    name = folder.name.lower()
    if name.startswith("bge-") and "-zh" in name:
        return INSTRUCTION_ZH
    if name.startswith("bge-") and "-en" in name:
        return INSTRUCTION_EN
    return None


def read_prompt_settings(embedder: "Embedder", folder: Path) -> None:
    """The other prompts, default_prompt_name and similarity_fn_name of config_sentence_transformers.json
    (the "query" prompt is the instruction, read by default_query_instruction)."""
    config = read_json(folder / "config_sentence_transformers.json") or {}
    for name, prompt in (config.get("prompts") or {}).items():
        if name != "query" and isinstance(prompt, str):
            embedder.prompts[name] = prompt
    if config.get("default_prompt_name") in embedder.prompts:
        embedder.default_prompt_name = config["default_prompt_name"]
    if config.get("similarity_fn_name") in SIMILARITY_FUNCTIONS:
        embedder.similarity_fn_name = config["similarity_fn_name"]


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The weights' dtype for this device. On the CPU: float16 falls back to float32 with a warning (as
    FlagEmbedding does: no CPU multiplies fp16 fast), and bfloat16 runs where the CPU multiplies it in
    hardware (AVX-512 BF16 or AMX) and is refused elsewhere, where it would be emulated and slower.
    Its vectors differ from float32's by about 1 − cos ≈ 4e-3 (docs/benchmarks.md has the scores)."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    if dtype is None:
        return torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("%s requested on the CPU; using float32", dtype)
        return torch.float32
    if dtype == torch.bfloat16:
        require_native_bf16(device, "bfloat16")
    return dtype


def length_sorted_batches(lengths, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Positions 0..n-1 ordered by length, longest first, cut into batches of at most batch_size
    items and (when given) max_tokens tokens. The one length-sorted batching in minibge: encode,
    the reranker, the benchmark's peers and the CLI all batch through it.

    Why sort: a batch is padded to its longest member, so neighbours of equal length waste nothing;
    longest first, so an out-of-memory error surfaces on the first batch rather than the last. The
    sort is stable, so equal lengths keep their input order (the result is deterministic). Why a
    token budget besides batch_size: a batch costs its tokens, not its texts, so the budget bounds
    memory and time alike; an item longer than the budget goes alone.
    """
    order = np.argsort([-n for n in lengths], kind="stable")
    batches, start, tokens = [], 0, 0
    for i, n in enumerate(lengths[j] for j in order):
        if i > start and (i - start == batch_size or (max_tokens is not None and tokens + n > max_tokens)):
            batches.append(order[start:i])
            start, tokens = i, 0
        tokens += n
    if start < len(order):
        batches.append(order[start:])
    return batches


def positive_int(value, name: str) -> int:
    """value as an int (numpy integers welcome, as in sentence-transformers), or a clear error."""
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def as_text_list(texts) -> list[str]:
    """A list of str from what sentence-transformers accepts (a list, a tuple, a numpy string array,
    a pandas Series, any other sequence), each item checked; a TypeError names the first bad one."""
    if isinstance(texts, (list, tuple)):
        texts = list(texts)
    elif isinstance(texts, np.ndarray) and texts.ndim == 1 and texts.dtype.kind in "UO":
        texts = texts.tolist()
    elif type(texts).__module__.startswith("pandas") and hasattr(texts, "tolist"):
        texts = texts.tolist()  # a pandas Series (pandas itself is not imported)
    check_texts(texts)
    return texts


class Embedder:
    """A tokenizer + a BertModel + the pooling / normalisation / instruction settings around them.

    encode() is one pipeline for every input, written out in iter_batches:

        texts ─tokenize (a window of sort_window texts at a time)─▶ token ids per text
              ─order by token count, cut batches (batch_size texts, max_tokens tokens)─▶ batches
              ─pad─▶ (B, T) ─run the encoder─▶ (B, T, H) ─pool─▶ (B, H) ─normalise─▶ restore order

    "Run the encoder" is the model itself (model.py) or, by default, the fast backend over the same
    weights (fast/encoder.py: the same function, computed on packed real tokens); the embedder holds
    a handle to it and nothing else of it. The backend is taken only where it computes exactly what
    the model computes (fast_path_blocker).
    """

    def __init__(self, model, tokenizer: Tokenizer, pooling: str = "cls", max_length: int = 512,
                 query_instruction: str | None = None, name: str = "model", fast: bool = True):
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {sorted(POOLING)}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = min(max_length, model.config.max_sequence_length)  # XLM-R: 514 positions, 512 tokens
        # sentence-transformers' prompts: "query" is BGE's retrieval instruction (query_instruction reads
        # and writes it), "document" none: "no instruction needs to be added to passages" (the BGE card)
        self.prompts = {"query": query_instruction or "", "document": ""}
        self.default_prompt_name = None
        self.similarity_fn_name = "cosine"
        self.name = name
        self.folder = None  # the checkpoint folder it was loaded from (load_embedder sets it), if any
        # the pipeline's batching: texts tokenized and sorted by token count together, and real tokens
        # per batch at most (a batch costs its tokens; docs/benchmarks.md has the measurements)
        self.sort_window = 4096
        self.max_tokens = MAX_TOKENS
        # the fast backend (fast/encoder.py), unless fast=False or the model was changed in a way it
        # cannot follow (fast_path_blocker); built on first use
        self.fast = fast
        self._fast_encoder, self._fast_options = None, {}
        self._reported_blocker, self._warned_training = None, False

    @property
    def query_instruction(self) -> str | None:
        """The retrieval instruction put before queries (prompts["query"]); None when there is none."""
        return self.prompts.get("query") or None

    @query_instruction.setter
    def query_instruction(self, value: str | None) -> None:
        self.prompts["query"] = value or ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    def get_embedding_dimension(self) -> int:
        """sentence-transformers' name for `dimension` (get_sentence_embedding_dimension before 6.0)."""
        return self.dimension

    get_sentence_embedding_dimension = get_embedding_dimension

    @property
    def max_seq_length(self) -> int:
        """sentence-transformers' name for `max_length`: texts are cut to this many tokens."""
        return self.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.max_length = min(positive_int(value, "max_seq_length"), self.model.config.max_sequence_length)

    def __repr__(self):
        return (f"Embedder({self.name!r}, dim={self.dimension}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, device={self.device})")

    # -------------------------------------------------------------------------
    # The fast backend: a handle, and the gate that decides whether encode() may use it

    @property
    def fast_encoder(self) -> "fast_path.FastEncoder":
        """The FastEncoder over this embedder's model, built on first use (use_fast_path to configure)
        and built again when the model was replaced or moved to another kind of device (the CPU and
        CUDA want different attention modes)."""
        encoder = self._fast_encoder
        if encoder is None or encoder.model is not self.model or encoder.device_type != self.device.type:
            self._fast_encoder = fast_path.FastEncoder(self.model, **self._fast_options)
        return self._fast_encoder

    def use_fast_path(self, **options) -> "Embedder":
        """Have encode() take the fast path, built with these FastEncoder options now
        (attention="buckets"/"padded"/"nested"/"varlen", fuse_qkv=, onednn=, prepack=). Returns self."""
        self.fast = True
        self._fast_encoder, self._fast_options = fast_path.FastEncoder(self.model, **options), options
        return self

    def fast_path_blocker(self) -> str | None:
        """None when encode() takes the fast path; otherwise the reason it takes the plain one."""
        if not self.fast:
            return "fast=False"
        customised = [name for name in ("embed",)
                      if name in vars(self) or getattr(type(self), name) is not getattr(Embedder, name)]
        if customised:
            return f"{customised[0]}() is customised"
        return fast_path.model_blocker(self.model)

    # -------------------------------------------------------------------------
    # The differentiable path, for training loops

    def length_limit(self, max_length: int | None) -> int:
        """The caller's max_length, never above the embedder's own limit (which is the default)."""
        if max_length is None:
            return self.max_length
        return min(positive_int(max_length, "max_length"), self.max_length)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict:
        """Texts → {"input_ids", "attention_mask"} (B, T) long tensors on the model's device, right-padded,
        each text cut to max_length tokens (the embedder's own limit by default, never above it)."""
        max_length = self.length_limit(max_length)
        return self.pad(self.tokenizer.encode_batch(texts, max_length))

    def pad(self, ids: list[list[int]]) -> dict:
        """Token ids per text → {"input_ids", "attention_mask"} (B, T) on the model's device."""
        input_ids, attention_mask = self.tokenizer.pad(ids)
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, T, H) token vectors → (B, H) sentence vectors: the pooling, then unit length when asked."""
        pooled = POOLING[self.pooling](hidden, attention_mask)  # (B, H)
        return l2_normalize(pooled) if normalize else pooled

    def embed(self, texts_or_batch, max_length: int | None = None, normalize: bool = True) -> torch.Tensor:
        """The differentiable path, for training loops: texts (or a batch from `tokenize`) → (B, D).

        Unlike encode(), nothing here is wrapped in no_grad, nothing is sorted or moved to numpy, and
        the model's train()/eval() mode is left as the caller set it (dropout acts in train mode).
        """
        batch = texts_or_batch if isinstance(texts_or_batch, Mapping) else self.tokenize(texts_or_batch, max_length)
        if "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError(f"a batch must hold input_ids and attention_mask, got keys {sorted(batch)}")
        hidden = self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # (B, T, H)
        return self.pool(hidden, batch["attention_mask"], normalize)

    # -------------------------------------------------------------------------
    # encode(): the inference pipeline

    def iter_batches(self, sentences: list[str], batch_size: int = BATCH_SIZE, max_length: int | None = None,
                     normalize_embeddings: bool = True, show_progress_bar: bool | None = None,
                     output_value: str = "sentence_embedding"):
        """Yield (indices, out) batch by batch, longest texts first: out is a (b, D) float32 tensor of
        sentence vectors, or with output_value="token_embeddings" a list of (n_i, H) float32 tensors,
        each text's real tokens only (not normalised). Memory is bounded by the window (sort_window
        texts tokenized at a time) and the batch, never by the input.
        """
        sentences = as_text_list(sentences)
        batch_size = positive_int(batch_size, "batch_size")
        window = positive_int(self.sort_window, "sort_window")
        max_tokens = positive_int(self.max_tokens, "max_tokens")
        max_length = self.length_limit(max_length)
        run = self.batch_step(normalize_embeddings, output_value)
        progress = self._progress_bar(len(sentences), show_progress_bar)
        try:
            for first in range(0, len(sentences), window):
                ids = self.tokenizer.encode_batch(sentences[first:first + window], max_length)   # 1. tokenize
                batches = length_sorted_batches([len(x) for x in ids], batch_size, max_tokens)    # 2. order by length
                if progress is not None:
                    progress.total = (progress.total or 0) + len(batches)  # known one window at a time
                    progress.refresh()
                for members in batches:
                    with torch.inference_mode():
                        out = run(self.pad([ids[i] for i in members]))                             # 3-5. (b, D)
                    if progress is not None:
                        progress.update()
                    yield members + first, out
        finally:
            if progress is not None:
                progress.close()

    def batch_step(self, normalize: bool, output_value: str = "sentence_embedding"):
        """Steps 3-5 of the pipeline for one padded batch: run the encoder, pool, normalise.

        The encoder is the fast backend when it computes exactly what the model computes, else the
        model itself (the reason logged once: a research change to the model's code takes the plain
        path on purpose). On the plain path the step is embed(), so a subclass's embed() is what
        encode() runs. Float32 out: numpy has no bfloat16, and callers expect it.
        """
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
        if self.model.training and not self._warned_training:
            # I leave the mode as the caller set it (the lab's "forgot model.eval()" is a real mistake to
            # see), but say so loudly: sentence-transformers switches to eval itself
            logger.warning("encode() on a model in train mode: dropout is on, so the vectors are noisy; "
                           "call embedder.model.eval() first")
            self._warned_training = True
        blocker = self.fast_path_blocker()
        if blocker is None:
            encoder = self.fast_encoder
            encoder.sync()  # weights changed since it was built (an optimizer step) are picked up here
        else:
            if blocker != self._reported_blocker and self.fast:
                logger.info("encode() takes the plain path: %s", blocker)
                self._reported_blocker = blocker
            encoder = self.model

        def token_embeddings(batch):
            hidden = encoder(batch["input_ids"], batch["attention_mask"])                  # (b, T, H)
            return [h[:n].float() for h, n in zip(hidden, batch["attention_mask"].sum(dim=1).tolist())]

        def fast_sentence_embeddings(batch):
            mask = batch["attention_mask"]
            if self.pooling == "cls" and mask.shape[1] and bool(mask[:, 0].all()):
                # [CLS] pooling reads one row per text, so the last block computes only those rows
                hidden = encoder.first_tokens(batch["input_ids"], mask)[:, None]            # (b, 1, H)
            else:
                hidden = encoder(batch["input_ids"], mask)                                 # (b, T, H)
            return self.pool(hidden, mask, normalize).float()                              # (b, D)

        if output_value == "token_embeddings":
            return token_embeddings
        if blocker is None:
            return fast_sentence_embeddings
        return lambda batch: self.embed(batch, normalize=normalize).float()

    def _progress_bar(self, n_texts: int, show: bool | None):
        """A tqdm bar over batches, or None. As sentence-transformers: with show=None, a bar when
        logging asks for INFO; otherwise only for big inputs at a terminal, never into a log file."""
        if show is None:
            show = logger.getEffectiveLevel() <= logging.INFO or (
                n_texts >= PROGRESS_BAR_MIN_TEXTS and sys.stderr is not None and sys.stderr.isatty())
        if not show:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=0, desc="Batches", unit="batch")

    def encode(self, sentences, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = BATCH_SIZE,
               show_progress_bar: bool | None = None, output_value: str = "sentence_embedding",
               precision: str = "float32", convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               device=None, normalize_embeddings: bool = True, truncate_dim: int | None = None,
               chunk_size: int | None = None, *, max_length: int | None = None, ranges=None,
               calibration_embeddings=None):
        """Embed one string (→ (D,)) or a list of strings (→ (N, D)), in input order.

        sentence-transformers' signature and meanings (version 5 and later), with two differences in
        the defaults: normalize_embeddings=True (BGE's vectors are compared by dot product, as in
        FlagEmbedding) and batch_size=256 (FlagEmbedding's; BATCH_SIZE says why); max_length, a
        minibge extra, cuts texts below max_seq_length for one call.
        - prompt / prompt_name: a string put before every text (prompt wins), or a key of self.prompts
          ("query" is BGE's retrieval instruction); default_prompt_name when neither is given.
        - truncate_dim: keep the first d dimensions (Matryoshka), then normalise when asked.
        - precision: float32, or int8 / uint8 / binary / ubinary as quantization.quantize_embeddings
          computes them from this call's float vectors: with their own ranges, as sentence-transformers,
          or (minibge extras) with `ranges` (2, D) or ranges from `calibration_embeddings`.
        - output_value="token_embeddings": a list of (n_i, H) arrays, each text's real tokens.
        - device: moves the model there first (as sentence-transformers); several devices are refused.
        - chunk_size: sentence-transformers' multi-process chunking; there is no pool here, so unused.
        Returns numpy by default; a torch tensor with convert_to_tensor=True; a list of 1-D tensors
        when both conversions are off.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
        if isinstance(device, (list, tuple)):
            raise ValueError("encode() runs on one device; for several, run `minibge encode` under torchrun "
                             "(one process per device)")
        if device is not None:
            self.model.to(device)
        if truncate_dim is not None:
            truncate_dim = min(positive_int(truncate_dim, "truncate_dim"), self.dimension)
        single = isinstance(sentences, str)
        texts = [sentences] if single else as_text_list(sentences)
        prompt = self.resolve_prompt(prompt, prompt_name)
        if prompt:
            texts = [prompt + text for text in texts]
        if output_value == "token_embeddings":
            out = [None] * len(texts)
            for indices, batch in self.iter_batches(texts, batch_size, max_length, False, show_progress_bar,
                                                    output_value):
                for i, tokens in zip(indices, batch):
                    out[i] = tokens if convert_to_tensor or not convert_to_numpy else tokens.cpu().numpy()
            return out[0] if single else out
        # with truncate_dim, normalising waits until the vectors are cut: a unit vector's head is not one
        normalize_now = normalize_embeddings and truncate_dim is None
        on_device = (convert_to_tensor or not convert_to_numpy) and precision == "float32"
        out = (torch.empty((len(texts), self.dimension), device=self.device) if on_device
               else np.empty((len(texts), self.dimension), dtype=np.float32))
        for indices, batch in self.iter_batches(texts, batch_size, max_length, normalize_now, show_progress_bar):
            # writing each batch straight into its rows restores the input order as we go   6. restore order
            out[torch.as_tensor(indices, device=self.device) if on_device else indices] = \
                batch if on_device else batch.cpu().numpy()
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
            if normalize_embeddings:
                out = (l2_normalize(out) if on_device
                       else l2_normalize(torch.from_numpy(np.ascontiguousarray(out))).numpy())
        if precision != "float32":
            out = quantize_embeddings(out, precision, ranges=ranges, calibration_embeddings=calibration_embeddings)
            if convert_to_tensor:
                out = torch.from_numpy(out)
        if single:
            return out[0]
        if not convert_to_tensor and not convert_to_numpy:
            return list(out if isinstance(out, torch.Tensor) else torch.from_numpy(out))
        return out

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The prompt a call asks for, as sentence-transformers resolves it."""
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return None
        if name not in self.prompts:
            raise ValueError(f"prompt_name {name!r} is not one of this model's prompts {sorted(self.prompts)}")
        return self.prompts[name]

    def encode_query(self, sentences, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """sentence-transformers 5's name: encode() with the "query" prompt (BGE's instruction)."""
        if prompt is None and prompt_name is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences, prompt_name: str | None = None, prompt: str | None = None, **kwargs):
        """sentence-transformers 5's name: encode() with the first of the "document", "passage",
        "corpus" prompts this model has ("" for BGE: passages never get an instruction)."""
        if prompt is None and prompt_name is None:
            prompt_name = next((name for name in ("document", "passage", "corpus") if name in self.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_queries(self, queries, instruction: str | None = None, **kwargs):
        """FlagEmbedding's name: encode() with the retrieval instruction prepended (plain concatenation)."""
        instruction = self.query_instruction if instruction is None else instruction
        return self.encode(queries, prompt=instruction or None, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """FlagEmbedding's name: encode() for passages, never an instruction."""
        return self.encode(corpus, **kwargs)

    def similarity(self, a, b):
        """The (len(a), len(b)) score matrix under this model's similarity_fn_name (sentence-transformers'
        cosine / dot / euclidean / manhattan; distances come negated, so higher is always closer)."""
        return similarity(a, b, self.similarity_fn_name)

    def similarity_pairwise(self, a, b):
        """Row i of a against row i of b, under this model's similarity_fn_name."""
        return similarity_pairwise(a, b, self.similarity_fn_name)

    def save_pretrained(self, directory) -> Path:
        """Write a complete checkpoint folder that load_embedder, transformers' AutoModel /
        AutoTokenizer and SentenceTransformer all reload with this pooling, length and instruction:

            config.json, model.safetensors       the encoder, official BGE layout (weights.py)
            tokenizer.json, vocab.txt, ...       the tokenizer (tokenizer.py)
            modules.json                         sentence-transformers: Transformer → Pooling → Normalize
            1_Pooling/config.json                "cls" or "mean"
            sentence_bert_config.json            max_seq_length
            config_sentence_transformers.json    prompts: {"query": instruction}, used by prompt_name="query"
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(directory) as partial:  # built beside it, then moved in: never half a folder
            save_model(self.model, partial)
            self.tokenizer.save_pretrained(partial)
            write_sentence_transformers_files(partial, self.pooling, self.max_length, self.dimension,
                                              self.query_instruction, prompts=self.prompts,
                                              default_prompt_name=self.default_prompt_name,
                                              similarity_fn_name=self.similarity_fn_name)
        return directory


def write_sentence_transformers_files(directory: Path, pooling: str, max_length: int, dimension: int,
                                      query_instruction: str | None, prompts: dict | None = None,
                                      default_prompt_name: str | None = None,
                                      similarity_fn_name: str = "cosine") -> None:
    """The small JSON files with which sentence-transformers (and load_embedder) read a folder."""
    def write(path: Path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write(directory / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dimension,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "include_prompt": True,  # the instruction's tokens take part in mean pooling, as in encode_queries
    })
    (directory / "2_Normalize").mkdir(exist_ok=True)
    write(directory / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    write(directory / "config_sentence_transformers.json", {
        "prompts": {**(prompts or {}), "query": query_instruction or "", "document": (prompts or {}).get("document", "")},
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": similarity_fn_name,
    })


def load_embedder(name_or_path, device=None, dtype=None, attn_impl: str = "sdpa", pooling: str | None = None,
                  max_length: int | None = None, query_instruction: str | None = None, fast: bool = True) -> Embedder:
    """A local checkpoint folder or a Hub id ("BAAI/bge-small-en-v1.5") → a ready Embedder.

    Hub ids are looked up under weights/ first and downloaded only when missing (see hub.py).
    device defaults to CUDA when available; dtype "float16" applies on CUDA only, "bfloat16" on CUDA
    and on CPUs that multiply it in hardware (resolve_dtype). fast=False makes encode() run the plain
    model (model.py) rather than the fast backend (fast/).
    """
    folder = resolve_model_path(name_or_path)
    check_side_files(folder)  # each field of the JSON files read below, with errors naming file and field
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(folder, attn_impl=attn_impl, device=device, dtype=resolve_dtype(dtype, device))
    tokenizer = Tokenizer.from_pretrained(folder)
    if max_length is None:
        max_length = (read_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length") \
            or tokenizer.model_max_length
    embedder = Embedder(model, tokenizer, pooling=pooling or read_pooling_mode(folder) or "cls",
                        max_length=max_length, name=str(name_or_path), fast=fast,
                        query_instruction=default_query_instruction(folder) if query_instruction is None
                        else query_instruction)
    read_prompt_settings(embedder, folder)
    embedder.folder = folder
    logger.info("loaded %r", embedder)
    return embedder
