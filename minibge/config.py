"""BertConfig: the handful of numbers that pin down a BERT/BGE encoder.

Field names are Hugging Face's, so a checkpoint's `config.json` maps onto the dataclass with no
translation table: unknown keys (`architectures`, `transformers_version`, the Chinese models'
`pooler_*` leftovers, ...) are ignored, and a missing required key is a clear error.

Every field is checked when a config is made, against the table RULES: its type (a JSON `true` is
not 1 layer, `"384"` is not a width, `6.0` is not a layer count) and its range, then that the
heads split hidden_size evenly. A bad config.json fails there, naming the field, the value and
the file, rather than deep inside torch (0 heads would be a ZeroDivisionError in attention, a
vocabulary of -5 a RuntimeError from nn.Embedding).

Two families share the one dataclass, told apart by `model_type` (config.json's own key):
"bert" (every BGE v1/v1.5 embedder) and "xlm-roberta" (BGE-M3 and the BGE rerankers). XLM-RoBERTa
is the same post-LN encoder with other numbers and one other rule (model.py, "XLM-RoBERTa"):

    field                      BERT (BGE)   XLM-RoBERTa (bge-reranker-base, bge-m3)
    vocab_size                 30522        250002 (SentencePiece, 100 languages)
    layer_norm_eps             1e-12        1e-5
    type_vocab_size            2            1 (one segment row, still added)
    pad_token_id               0 ([PAD])    1 (<pad>; <s> is 0, </s> is 2)
    max_position_embeddings    512          514 (8194 for M3): positions start at pad_token_id + 1,
                                            so 512 (8192) tokens fit: max_sequence_length

The presets are every published BGE English and Chinese model, v1 and v1.5 (the BAAI/bge-* Hub
repositories). v1 and v1.5 share one architecture; only the weights (and the training temperature)
differ. Each preset is the shape in that model's config.json: hidden size H, layers L, heads,
feed-forward width I and vocabulary, all other fields BERT's defaults. The parameter counts beside
the v1.5 presets are the official ones (FlagEmbedding's model list, pooler included);
tests/test_model.py checks that each builds a model of exactly that size, so a wrong shape cannot
pass unnoticed.
"""
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .common import read_json

# the activations `hidden_act` may name; "gelu" is the exact erf form (what HF and BGE use)
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# config.json's model_type -> the architectures it is saved as (transformers' AutoModel reads both)
MODEL_TYPES = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel"}

# field(s) -> (type, valid when, what valid means); every field of BertConfig appears once
RULES = {
    ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
     "max_position_embeddings", "type_vocab_size"): (int, lambda v: v >= 1, "at least 1"),
    ("pad_token_id",): (int, lambda v: v >= 0, "at least 0"),
    ("layer_norm_eps",): (float, lambda v: 0 < v < 1, "between 0 and 1"),
    ("hidden_dropout_prob", "attention_probs_dropout_prob"): (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("initializer_range",): (float, lambda v: 0 <= v < math.inf, "at least 0"),
    ("hidden_act",): (str, lambda v: v in SUPPORTED_ACTIVATIONS, f"one of {SUPPORTED_ACTIVATIONS}"),
    ("position_embedding_type",): (str, lambda v: v == "absolute", "'absolute' (the only kind BERT/BGE use)"),
    ("model_type",): (str, lambda v: v in MODEL_TYPES, f"one of {sorted(MODEL_TYPES)}"),
}


def _has_type(value, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass in Python; in a config it is a mistake
        return False
    if kind is float:  # JSON writes 0.0 as 0 sometimes: an int is a fine float
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass
class BertConfig:
    vocab_size: int = 30522            # WordPiece vocabulary (English uncased); 21128 for Chinese BGE
    hidden_size: int = 768             # H: the width of every token vector, and the embedding dimension
    num_hidden_layers: int = 12        # L: number of post-LN transformer blocks
    num_attention_heads: int = 12      # H must split evenly into heads of H / heads dims
    intermediate_size: int = 3072      # I: feed-forward inner width, 4H for every BGE model except small-zh
    hidden_act: str = "gelu"           # exact erf GELU; the tanh approximation drifts from HF
    layer_norm_eps: float = 1e-12      # BERT's eps, not PyTorch's default 1e-5
    max_position_embeddings: int = 512  # absolute learned positions: sequences longer than this can't be encoded
    type_vocab_size: int = 2           # segment A/B embeddings; BGE always uses segment 0, but row 0 is still added
    pad_token_id: int = 0              # [PAD]; its word-embedding row is zeroed at init
    hidden_dropout_prob: float = 0.1   # only active in training
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02    # std of the normal init (HF semantics), used by training from scratch
    position_embedding_type: str = "absolute"  # the only kind BERT/BGE use; checked, not implemented otherwise
    model_type: str = "bert"           # "bert" or "xlm-roberta": which position rule the embeddings follow

    # the fields a config.json must carry; the rest fall back to BERT's defaults above
    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

    def __post_init__(self):
        for names, (kind, valid, meaning) in RULES.items():
            for name in names:
                value = getattr(self, name)
                if not _has_type(value, kind):
                    raise TypeError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, "
                                    f"got {value!r} ({type(value).__name__})")
                if not valid(value):
                    raise ValueError(f"{name} must be {meaning}, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not below vocab_size {self.vocab_size}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} leaves no position for a token: "
                             f"XLM-RoBERTa's positions start at pad_token_id + 1 = {self.position_offset}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """The position id of a sentence's first token: 0 for BERT; pad_token_id + 1 for XLM-RoBERTa,
        which keeps rows 0..pad_token_id of its position table unused by real tokens (model.py)."""
        return self.pad_token_id + 1 if self.model_type == "xlm-roberta" else 0

    @property
    def max_sequence_length(self) -> int:
        """The most tokens one sentence may have: 512 for BERT (512 positions) and for XLM-RoBERTa (514)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "BertConfig":
        missing = [key for key in cls.REQUIRED if key not in values]
        if missing:
            raise ValueError(f"{source} is missing required key(s) {missing}")
        known = {field.name for field in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in values.items() if key in known})
        except (TypeError, ValueError) as err:
            raise type(err)(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        values = read_json(path)  # untrusted: a FIFO, /dev/zero, a huge or deeply nested file is a ValueError
        if not isinstance(values, dict):
            raise ValueError(f"{path} should hold a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        """The config.json that transformers' AutoModel reads back as a BertModel (an XLMRobertaModel)."""
        return {"architectures": [MODEL_TYPES[self.model_type]], **dataclasses.asdict(self)}


def _bge(hidden, layers, heads, intermediate, vocab) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=intermediate)


_EN, _ZH = 30522, 21128
PRESETS = {
    # name: (H, L, heads, I, vocab)           parameters incl. pooler (official count)
    "bge-small-en-v1.5": _bge(384, 12, 12, 1536, _EN),    # 33.4M
    "bge-base-en-v1.5": _bge(768, 12, 12, 3072, _EN),     # 109M
    "bge-large-en-v1.5": _bge(1024, 24, 16, 4096, _EN),   # 335M
    "bge-small-en": _bge(384, 12, 12, 1536, _EN),
    "bge-base-en": _bge(768, 12, 12, 3072, _EN),
    "bge-large-en": _bge(1024, 24, 16, 4096, _EN),
    "bge-small-zh-v1.5": _bge(512, 4, 8, 2048, _ZH),      # 24M: the one model that is not 4H wide
    "bge-base-zh-v1.5": _bge(768, 12, 12, 3072, _ZH),     # 102M
    "bge-large-zh-v1.5": _bge(1024, 24, 16, 4096, _ZH),   # 326M
    "bge-small-zh": _bge(512, 4, 8, 2048, _ZH),
    "bge-base-zh": _bge(768, 12, 12, 3072, _ZH),
    "bge-large-zh": _bge(1024, 24, 16, 4096, _ZH),
}



def _xlmr(hidden, layers, heads, intermediate, positions) -> BertConfig:
    return BertConfig(vocab_size=250002, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=positions, type_vocab_size=1,
                      layer_norm_eps=1e-5, pad_token_id=1, model_type="xlm-roberta")


# The XLM-RoBERTa models: BGE-M3 (an embedder) and the BGE cross-encoders (rerankers, reranker.py),
# the shapes of xlm-roberta-base / -large, M3 with 8192-token positions. Kept apart from PRESETS,
# whose parameter counts tests/test_model.py checks against the official BGE model list.
XLM_ROBERTA_PRESETS = {
    # name: (H, L, heads, I, positions)
    "bge-reranker-base": _xlmr(768, 12, 12, 3072, 514),
    "bge-reranker-large": _xlmr(1024, 24, 16, 4096, 514),
    "bge-reranker-v2-m3": _xlmr(1024, 24, 16, 4096, 8194),
    "bge-m3": _xlmr(1024, 24, 16, 4096, 8194),
}


def preset(name: str) -> BertConfig:
    """A fresh copy of a named BGE config ("bge-base-en-v1.5", or "BAAI/bge-base-en-v1.5", "bge-m3")."""
    key = name.split("/")[-1]
    known = {**PRESETS, **XLM_ROBERTA_PRESETS}
    if key not in known:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(known)}")
    return dataclasses.replace(known[key])
