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
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .common import read_json
from .fast import encoder as fast_path
from .hub import resolve_model_path
from .model import POOLING, l2_normalize
from .tokenizer import Tokenizer, check_texts
from .weights import load_model
from .weights import save_pretrained as save_model

logger = logging.getLogger(__name__)

# FlagEmbedding's retrieval instructions; added to short queries only, never to passages
INSTRUCTION_EN = "Represent this sentence for searching relevant passages: "
INSTRUCTION_ZH = "为这个句子生成表示以用于检索相关文章："
PROGRESS_BAR_MIN_TEXTS = 1024  # show_progress_bar=None shows a bar from this many texts on


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


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        dtype = names[dtype]
    if dtype is None:
        return torch.float32
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu":
        # as FlagEmbedding does: half precision on the CPU is slower and less exact, so stay in fp32
        logger.warning("%s requested on the CPU; using float32", dtype)
        return torch.float32
    return dtype


class Embedder:
    """A tokenizer + a BertModel + the pooling / normalisation / instruction settings around them."""

    def __init__(self, model, tokenizer: Tokenizer, pooling: str = "cls", max_length: int = 512,
                 query_instruction: str | None = None, name: str = "model", fast: bool = True):
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {sorted(POOLING)}, got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = min(max_length, model.config.max_sequence_length)  # XLM-R: 514 positions, 512 tokens
        self.query_instruction = query_instruction
        self.name = name
        # encode() through minibge/fast.py (same vectors, less work) unless fast=False or the
        # model was changed in a way the fast path cannot follow (fast_path_blocker)
        self.fast = fast
        self.max_tokens = 4096    # fast path: real tokens per batch at most (4096 ran 1.2× faster than
                                  # 16384 on SciFact abstracts: the (N, 1536) activations stay in cache)
        self.sort_window = 4096   # fast path: texts tokenized and sorted by token length together
        self._fast_encoder, self._fast_options = None, {}
        self._reported_blocker = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    def __repr__(self):
        return (f"Embedder({self.name!r}, dim={self.dimension}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, device={self.device})")

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
        (attention="buckets"/"padded"/"nested", fuse_qkv=, onednn=, prepack=). Returns self."""
        self.fast = True
        self._fast_encoder, self._fast_options = fast_path.FastEncoder(self.model, **options), options
        return self

    def fast_path_blocker(self) -> str | None:
        """None when encode() takes the fast path; otherwise the reason it takes the plain one."""
        if not self.fast:
            return "fast=False"
        customised = [name for name in ("embed", "embed_batch")
                      if name in vars(self) or getattr(type(self), name) is not getattr(Embedder, name)]
        if customised:
            return f"{customised[0]}() is customised"
        return fast_path.model_blocker(self.model)

    def length_limit(self, max_length: int | None) -> int:
        """The caller's max_length, never above the embedder's own limit (which is the default)."""
        if max_length is None:
            return self.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        return min(max_length, self.max_length)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict:
        """Texts → {"input_ids", "attention_mask"} (B, T) long tensors on the model's device, right-padded,
        each text cut to max_length tokens (the embedder's own limit by default, never above it)."""
        max_length = self.length_limit(max_length)
        input_ids, attention_mask = self.tokenizer.pad(self.tokenizer.encode_batch(texts, max_length))
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def embed(self, texts_or_batch, max_length: int | None = None, normalize: bool = True) -> torch.Tensor:
        """The differentiable path, for training loops: texts (or a batch from `tokenize`) → (B, D).

        Unlike encode(), nothing here is wrapped in no_grad, nothing is sorted or moved to numpy, and
        the model's train()/eval() mode is left as the caller set it (dropout acts in train mode).
        """
        batch = texts_or_batch if isinstance(texts_or_batch, Mapping) else self.tokenize(texts_or_batch, max_length)
        if "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError(f"a batch must hold input_ids and attention_mask, got keys {sorted(batch)}")
        hidden = self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # (B, T, H)
        pooled = POOLING[self.pooling](hidden, batch["attention_mask"])  # (B, H)
        return l2_normalize(pooled) if normalize else pooled

    @torch.inference_mode()
    def embed_batch(self, texts: list[str], max_length: int, normalize: bool) -> torch.Tensor:
        """One forward pass for encode(): texts → (B, D) on the model's device, in the model's dtype."""
        return self.embed(texts, max_length, normalize)

    def iter_batches(self, sentences: list[str], batch_size: int = 32, max_length: int | None = None,
                     normalize_embeddings: bool = True, show_progress_bar: bool | None = None):
        """Yield (indices, embeddings (b, D) float32 tensor) batch by batch, longest texts first.

        Two paths compute the same vectors (per-text cosine ≥ 0.99999, tests/test_fast.py):
        the fast one (minibge/fast.py: token-length windows, packed tokens, fused kernels) when
        fast_path_blocker() is None, else the plain one below, which runs `embed` on padded
        batches. Memory is bounded either way: texts are tokenized a batch (plain) or a window
        (fast) at a time.
        """
        check_texts(sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        max_length = self.length_limit(max_length)
        progress = self._progress_bar(len(sentences), show_progress_bar)
        blocker = self.fast_path_blocker()
        if blocker is None:
            batches = fast_path.iter_fast_batches(self, self.fast_encoder, sentences, batch_size, max_length,
                                                  normalize_embeddings, progress)
        else:
            if blocker != self._reported_blocker and self.fast:
                logger.info("encode() takes the plain path: %s", blocker)
                self._reported_blocker = blocker
            batches = self._plain_batches(sentences, batch_size, max_length, normalize_embeddings, progress)
        try:
            yield from batches
        finally:
            if progress is not None:
                progress.close()

    def _plain_batches(self, sentences, batch_size, max_length, normalize, progress):
        """Padded batches through embed(). I sort by character length, as sentence-transformers
        does: a cheap proxy for token length, and each batch is tokenized when it comes up."""
        order = np.argsort([-len(text) for text in sentences], kind="stable")
        if progress is not None:
            progress.total = -(-len(sentences) // batch_size)
            progress.refresh()
        for start in range(0, len(sentences), batch_size):
            indices = order[start:start + batch_size]
            batch = self.embed_batch([sentences[i] for i in indices], max_length, normalize)
            if progress is not None:
                progress.update()
            yield indices, batch.float()  # numpy has no bfloat16, and callers expect float32

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

    def encode(self, sentences, batch_size: int = 32, max_length: int | None = None,
               normalize_embeddings: bool = True, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, show_progress_bar: bool | None = None):
        """Embed one string (→ (D,)) or a list of strings (→ (N, D)), in input order.

        Returns numpy float32 by default; a torch tensor on the model's device with
        convert_to_tensor=True; a list of 1-D tensors when both conversions are off.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else sentences
        check_texts(texts)
        on_device = convert_to_tensor or not convert_to_numpy
        out = (torch.empty((len(texts), self.dimension), device=self.device) if on_device
               else np.empty((len(texts), self.dimension), dtype=np.float32))
        for indices, batch in self.iter_batches(texts, batch_size, max_length, normalize_embeddings, show_progress_bar):
            # writing each batch straight into its rows restores the input order as we go
            out[torch.as_tensor(indices, device=self.device) if on_device else indices] = \
                batch if on_device else batch.cpu().numpy()
        if single:
            return out[0]
        if not convert_to_tensor and not convert_to_numpy:
            return list(out)
        return out

    def encode_queries(self, queries, instruction: str | None = None, **kwargs):
        """encode() with the retrieval instruction prepended (plain concatenation, as FlagEmbedding does)."""
        instruction = self.query_instruction if instruction is None else instruction
        if instruction:
            if isinstance(queries, str):
                queries = instruction + queries
            else:
                check_texts(queries)
                queries = [instruction + query for query in queries]
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """encode() for passages: never an instruction."""
        return self.encode(corpus, **kwargs)

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
        save_model(self.model, directory)
        self.tokenizer.save_pretrained(directory)
        write_sentence_transformers_files(directory, self.pooling, self.max_length, self.dimension,
                                          self.query_instruction)
        return directory


def write_sentence_transformers_files(directory: Path, pooling: str, max_length: int, dimension: int,
                                      query_instruction: str | None) -> None:
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
        "prompts": {"query": query_instruction or "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })


def load_embedder(name_or_path, device=None, dtype=None, attn_impl: str = "sdpa", pooling: str | None = None,
                  max_length: int | None = None, query_instruction: str | None = None, fast: bool = True) -> Embedder:
    """A local checkpoint folder or a Hub id ("BAAI/bge-small-en-v1.5") → a ready Embedder.

    Hub ids are looked up under weights/ first and downloaded only when missing (see hub.py).
    device defaults to CUDA when available; dtype "float16"/"bfloat16" applies on CUDA only.
    fast=False makes encode() run the plain model (minibge/model.py) rather than minibge/fast.py.
    """
    folder = resolve_model_path(name_or_path)
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
    logger.info("loaded %r", embedder)
    return embedder
