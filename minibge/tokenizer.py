"""BERT WordPiece tokenization: text in, token ids out.

A BERT encoder never sees characters, only integer ids from a fixed vocabulary (30,522
entries for the uncased English models). Turning a string into those ids happens in four steps:

1. **Normalize.** Control characters are dropped and every kind of whitespace becomes a plain
   space (``clean_text``). Each CJK ideograph gets spaces around it, so that Chinese text,
   which has no spaces, becomes one "word" per character (``tokenize_chinese_chars``).
   Uncased models also lower-case the text and strip accents ("Héllo" -> "hello"): the text is
   decomposed (NFD) and the combining marks thrown away. Cased models keep both.
2. **Pre-tokenize.** Split on whitespace and around every punctuation mark: "don't!" becomes
   ``don ' t !``.
3. **WordPiece.** Each word is cut greedily into the longest pieces found in the vocabulary;
   pieces after the first carry a ``##`` prefix ("embeddings" -> ``em ##bed ##ding ##s``). A word
   that cannot be cut, or one longer than 100 characters, becomes ``[UNK]``.
4. **Post-process.** Wrap the sequence as ``[CLS] ... [SEP]``. The model pools or reads
   ``[CLS]``; ``[SEP]`` marks the end.

A cross-encoder (reranker.py) reads a (query, passage) *pair* as one sequence, and the checkpoint's
post-processor says how it is wrapped (encode_pairs):

    BERT          [CLS] query [SEP] passage [SEP]       token types 0 ... 0 1 ... 1
    XLM-RoBERTa   <s> query </s></s> passage </s>       token types all 0 (its type table has one row)

XLM-RoBERTa (BGE-M3, the BGE rerankers) is not WordPiece: its tokenizer.json holds a SentencePiece
Unigram model (250,002 pieces, "▁" marking a word start, <s> 0, <pad> 1, </s> 2, <unk> 3, <mask>
last). Loading it is the same call: the Rust library reads whatever pipeline the file describes.

Batches are then right-padded with ``[PAD]`` (id 0) to the longest sequence, and an attention
mask (1 = real token, 0 = padding) tells the encoder which positions to ignore.

The heavy lifting is done by the Rust ``tokenizers`` library; this module decides how to build
it from a checkpoint folder, truncates, pads and checks its inputs.
"""

import json
import logging
import threading
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer as _HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .common import atomic_folder, check_small_file, read_json_object

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512
_SPECIAL_NAMES = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value) -> str | None:
    # Special tokens are stored either as plain strings or as {"content": "[CLS]", ...} dicts.
    return value.get("content") if isinstance(value, dict) else value


def _read_tokenizer_json(path: Path) -> _HFTokenizer:
    """tokenizer.json through the tokenizers library, after the checks every side file gets (a
    regular file of bounded size); the library's own error (a bare Exception) becomes a ValueError
    naming the file, in one line."""
    check_small_file(path)
    try:
        return _HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception for a malformed file
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not a tokenizer the tokenizers library can read: {first_line}") from None


def _load_vocab(path: Path) -> dict[str, int]:
    # I read the file the way transformers does (one token per line, only "\n" stripped), so
    # the two can never disagree about what a line is; a repeated token keeps its last index.
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f.readlines())}


def _build_wordpiece(folder: Path, config: dict, specials: dict[str, str]) -> _HFTokenizer:
    """Rebuild the standard BERT pipeline from vocab.txt and tokenizer_config.json."""
    tok = _HFTokenizer(WordPiece(_load_vocab(folder / "vocab.txt"), unk_token=specials["unk_token"],
                                 continuing_subword_prefix="##", max_input_chars_per_word=100))
    lowercase = bool(config.get("do_lower_case", True))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),  # None means "strip iff lower-casing", as in BERT
        lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # Special tokens must be matched in the raw text before normalization, or a literal "[MASK]"
    # typed by a user would be lower-cased and split into "[", "mask", "]".
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    cls, sep = specials["cls_token"], specials["sep_token"]
    for t in (cls, sep):
        if tok.token_to_id(t) is None:
            raise ValueError(f"special token {t!r} is not in {folder / 'vocab.txt'}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return tok


def check_texts(texts) -> None:
    """A list/tuple of str, or a TypeError naming the first bad index and its type."""
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")


def _check_encodable(texts) -> None:
    # A Python str may hold lone surrogates (e.g. from a bad JSON escape); they have no UTF-8
    # form, so the Rust side rejects them. I name the culprit instead of a generic TypeError.
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"texts[{i}] is not valid Unicode: lone surrogate {text[err.start]!r} at "
                             f"position {err.start}; clean it with .encode('utf-8', 'replace').decode()") from None


class Tokenizer:
    """Text -> padded id tensors, matching ``transformers.AutoTokenizer`` id for id."""

    def __init__(self, tok: _HFTokenizer, specials: dict[str, str], model_max_length: int,
                 config: dict | None = None):
        # The library's own truncation and padding are switched off: tokenizer.json files often
        # ship with them enabled (all-MiniLM-L6-v2 truncates and pads to 128), and I want every
        # length decision to come from the caller's max_length.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._truncation_lock = threading.Lock()
        self.specials = dict(specials)
        self.config = dict(config or {})  # tokenizer_config.json as read, written back by save_pretrained
        self.model_max_length = model_max_length
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.cls_token_id = self._id_of(specials["cls_token"])
        self.sep_token_id = self._id_of(specials["sep_token"])
        self.mask_token_id = tok.token_to_id(specials["mask_token"])  # None if the vocabulary has no [MASK]
        pad_id = tok.token_to_id(specials["pad_token"])
        if pad_id is None:
            logger.warning("pad token %r is not in the vocabulary; padding with id 0",
                           specials["pad_token"])
        self.pad_token_id = 0 if pad_id is None else pad_id

    # A lock cannot be pickled or deep-copied; a copy gets a lock of its own (so copy.deepcopy, pickle
    # and multiprocessing work on a Tokenizer, and on an Embedder that holds one).
    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k != "_truncation_lock"}

    def __setstate__(self, state):
        vars(self).update(state)
        self._truncation_lock = threading.Lock()

    def _id_of(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load from a checkpoint folder: tokenizer.json if present, else vocab.txt + config."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a directory")
        config = read_json_object(folder / "tokenizer_config.json", {})
        special_map = read_json_object(folder / "special_tokens_map.json", {})
        specials = {}
        for name in _SPECIAL_NAMES:
            value = _token_str(config.get(name)) or _token_str(special_map.get(name))
            specials[name] = value or f"[{name.split('_')[0].upper()}]"

        max_len = config.get("model_max_length")
        # Checkpoints without a real limit store a huge sentinel (int(1e30)); I treat it as unset.
        if not isinstance(max_len, int) or not 0 < max_len <= 1_000_000:
            max_len = DEFAULT_MAX_LENGTH

        if (folder / "tokenizer.json").exists():
            logger.info("loading %s", folder / "tokenizer.json")
            tok = _read_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.txt").is_file():
            logger.info("no tokenizer.json in %s; building WordPiece from vocab.txt", folder)
            tok = _build_wordpiece(folder, config, specials)
        else:
            raise FileNotFoundError(
                f"no tokenizer found in {folder}: looked for tokenizer.json, or vocab.txt "
                "(with an optional tokenizer_config.json)")
        return cls(tok, specials, max_len, config)

    def encode_batch(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids per text, wrapped in [CLS]/[SEP] and cut to max_length tokens; not padded."""
        check_texts(texts)
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
        if not texts:
            return []
        # I let the library truncate rather than slicing afterwards: it is what transformers does,
        # so "drop the tail of the text, keep the final [SEP]" is exactly the same on both sides.
        # Truncation is a setting on the shared tokenizer, so the lock keeps two threads (LangChain's
        # async calls, a web server) from encoding with each other's setting.
        with self._truncation_lock:
            self._tok.enable_truncation(max_length)
            try:
                encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
            except TypeError:
                _check_encodable(texts)  # the library's own message here is cryptic
                raise
            finally:
                self._tok.no_truncation()
        return [enc.ids for enc in encodings]

    def encode_pairs(self, pairs, max_length: int, query_max_length: int | None = None,
                     passage_max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
        """(query, passage) pairs → (token ids, token type ids) per pair, not padded.

        Truncation is FlagEmbedding's reranker's: the query alone is cut to query_max_length tokens
        (default 3/4 of max_length), the passage alone to passage_max_length (default max_length; its
        fine-tuning uses 128); then the pair is wrapped in its special tokens and only the passage is
        cut further, from its end, until the whole fits in max_length. A long passage never pushes
        the query out.
        """
        if isinstance(pairs, (list, tuple)) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
            raise TypeError("pairs must be a list of (query, passage) pairs; wrap a single pair in a list")
        if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise TypeError("pairs must be a list of (query, passage) pairs")
        queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
        check_texts(queries)
        check_texts(passages)
        for name, value in (("max_length", max_length), ("query_max_length", query_max_length),
                            ("passage_max_length", passage_max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        query_max_length = max_length * 3 // 4 if query_max_length is None else query_max_length
        specials = self._tok.num_special_tokens_to_add(is_pair=True)  # 3 for BERT, 4 for XLM-R
        if not pairs:
            return []
        with self._truncation_lock:  # no truncation setting may be switched on while I encode (see encode_batch)
            try:
                query_encodings = self._tok.encode_batch(queries, add_special_tokens=False)
                passage_encodings = self._tok.encode_batch(passages, add_special_tokens=False)
            except TypeError:
                _check_encodable(queries)
                _check_encodable(passages)
                raise
        encoded = []
        for i, (query, passage) in enumerate(zip(query_encodings, passage_encodings)):
            query.truncate(query_max_length)
            room = max_length - specials - len(query.ids)
            if room < 0:  # transformers logs this and returns too many tokens; the model would then fail
                raise ValueError(f"pairs[{i}]: its query ({len(query.ids)} tokens after query_max_length "
                                 f"{query_max_length}) and {specials} special tokens leave no room for the "
                                 f"passage within max_length {max_length}; lower query_max_length")
            # "only_second": the passage alone is cut, from its end (the library's own only_second refuses
            # to cut a passage down to nothing, which transformers and FlagEmbedding allow)
            passage.truncate(min(room, max_length if passage_max_length is None else passage_max_length))
            pair = self._tok.post_process(query, passage, add_special_tokens=True)  # wrap in the specials
            encoded.append((pair.ids, pair.type_ids))
        return encoded

    def pad_pairs(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """encode_pairs' output → {"input_ids", "attention_mask", "token_type_ids"}, (B, T) long, right-padded."""
        input_ids, attention_mask = self.pad([ids for ids, _ in encoded])
        token_type_ids = torch.zeros_like(input_ids)
        for row, (_, types) in enumerate(encoded):
            token_type_ids[row, : len(types)] = torch.as_tensor(types, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """[101, 7861, 8270] -> ["[CLS]", "em", "##bed"]: the WordPiece strings, "##" marking a word's continuation."""
        return [self._tok.id_to_token(int(i)) for i in ids]

    def save_pretrained(self, directory) -> Path:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json, the
        files transformers' AutoTokenizer and sentence-transformers look for."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(directory) as partial:  # built beside it, then moved in (common.atomic_folder)
            self._write_files(partial)
        return directory

    def _write_files(self, directory: Path) -> None:
        self._tok.save(str(directory / "tokenizer.json"))  # truncation/padding are off (see __init__)
        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        assert [i for _, i in vocab] == list(range(len(vocab))), "vocabulary ids are not 0..V-1"
        (directory / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
        config = {"tokenizer_class": "BertTokenizer", **self.config, **self.specials,
                  "model_max_length": self.model_max_length}
        config.pop("added_tokens_decoder", None)  # stale ids from the source file; tokenizer.json has them
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(self.specials, indent=2) + "\n", encoding="utf-8")

    def pad(self, batch_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence; return (input_ids, attention_mask), both (B, T) long."""
        width = max((len(ids) for ids in batch_ids), default=0)
        input_ids = torch.full((len(batch_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def __call__(self, texts: list[str] | str, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """encode_batch + pad, returning the three tensors a BERT forward pass takes."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.encode_batch(texts, self.model_max_length if max_length is None else max_length)
        input_ids, attention_mask = self.pad(ids)
        # Single-sentence embedding: every token belongs to segment 0.
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids)}
