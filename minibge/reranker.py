"""Cross-encoders (rerankers): a (query, passage) pair in, one relevance score out.

An embedder (embedder.py) is a *bi-encoder*: query and passage are encoded apart, and their score
is a dot product, so a corpus is encoded once and searched in milliseconds. A cross-encoder reads
the two texts as ONE sequence, so every query token attends to every passage token in every layer:

    bi-encoder      [CLS] query [SEP] ─► q ┐
                    [CLS] passage [SEP] ─► p ┴─► q·p            passages encoded once, offline
    cross-encoder   [CLS] query [SEP] passage [SEP] ─► head ─► s  one forward pass per (query, passage)

That is more accurate and far slower (N passages cost N forward passes per query), which is why BGE
retrieves ~100 candidates with the embedder and reranks only those with a cross-encoder
(`minibge search --rerank`, docs/reranking.md).

The two heads, as transformers writes them (the head is chosen from config.json's
"architectures", else from "model_type" for a fresh head on a bare encoder):

    BertForSequenceClassification          (ms-marco MiniLM cross-encoders)
        h[CLS] ─► pooler: tanh(W·h + b) ─► dropout ─► classifier: Linear(H, num_labels)
    XLMRobertaForSequenceClassification    (bge-reranker-base / -large / -v2-m3)
        h[<s>] ─► dropout ─► classifier.dense: Linear(H, H) ─► tanh ─► dropout ─► classifier.out_proj: Linear(H, num_labels)
        (no pooler: its encoder is built without one, and a pooler in the folder is dropped)

BGE's rerankers have num_labels = 1: the logit itself is the relevance score (FlagReranker's raw
score; sigmoid(logit) with normalize=True). The encoder is model.py's BertModel for both families.

The checkpoint layout is one table per head, HEAD_KEY_MAP, beside weights.py's KEY_MAP for the encoder,
whose names sit under weights.PREFIXES ("bert." / "roberta.") in a task model.
"""
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .common import read_json
from .config import BertConfig
from .embedder import length_sorted_batches
from .hub import is_hub_id, resolve_model_path
from .model import BertModel, Pooler
from .tokenizer import Tokenizer
from .weights import (CONFIG_NAME, PREFIXES, copy_checked, load_state_into, normalize_names, read_state_dict,
                      save_pretrained)

logger = logging.getLogger(__name__)

# model_type -> the task architecture config.json names, and the head's official names -> ours
ARCHITECTURES = {"bert": "BertForSequenceClassification", "xlm-roberta": "XLMRobertaForSequenceClassification"}
HEAD_KEY_MAP = {
    "bert":        {"classifier":            "out_proj"},
    "xlm-roberta": {"classifier.dense":      "dense",
                    "classifier.out_proj":   "out_proj"},
}


class BertClassifierHead(nn.Module):
    """BertForSequenceClassification's head: the encoder's tanh pooler on [CLS], dropout, one Linear."""

    def __init__(self, config: BertConfig, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden, encoder: BertModel):
        return self.out_proj(self.dropout(encoder.pooler_output(hidden)))  # (B, T, H) -> (B, H) -> (B, num_labels)


class RobertaClassifierHead(nn.Module):
    """XLMRobertaForSequenceClassification's head: its own dense + tanh on <s> (the pooler's job, but
    separate weights), then the output Linear; dropout before each Linear."""

    def __init__(self, config: BertConfig, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden, encoder: BertModel):
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))  # (B, H): <s>, never the pooler
        return self.out_proj(self.dropout(x))                   # (B, num_labels)


HEADS = {"bert": BertClassifierHead, "xlm-roberta": RobertaClassifierHead}


class CrossEncoder(nn.Module):
    """BertModel + a sequence-classification head: (input_ids, attention_mask, token_type_ids) → logits (B, num_labels)."""

    def __init__(self, config: BertConfig, num_labels: int = 1, attn_impl: str = "sdpa",
                 classifier_dropout: float | None = None):
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        self.config = config
        self.num_labels = num_labels
        # transformers: classifier_dropout when the config sets it, else hidden_dropout_prob
        self.classifier_dropout = classifier_dropout
        dropout = config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        self.encoder = BertModel(config, attn_impl=attn_impl, add_pooler=config.model_type == "bert")
        self.head = HEADS[config.model_type](config, num_labels, dropout)
        self.head.apply(self.encoder._init_weights)  # HF's init: normal(0, 0.02), zero bias

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.encoder(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        return self.head(hidden, self.encoder)                            # (B, num_labels)

    def head_names(self) -> dict:
        """{head state_dict name: official name}, e.g. {"dense.weight": "classifier.dense.weight"}."""
        ours_to_official = {ours: official for official, ours in HEAD_KEY_MAP[self.config.model_type].items()}
        names = {}
        for name in self.head.state_dict():
            module, leaf = name.rsplit(".", 1)
            names[name] = f"{ours_to_official[module]}.{leaf}"
        return names

    def save_pretrained(self, directory) -> Path:
        """config.json + model.safetensors as transformers' ...ForSequenceClassification writes them:
        the encoder under its prefix, the head's tensors, num_labels as id2label."""
        head = self.head.state_dict()
        labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        extra_config = {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
                        "classifier_dropout": self.classifier_dropout}
        return save_pretrained(self.encoder, directory,
                               extra_tensors={official: head[ours] for ours, official in self.head_names().items()},
                               architectures=[ARCHITECTURES[self.config.model_type]],
                               prefix=PREFIXES[self.config.model_type], extra_config=extra_config)


def load_cross_encoder(path, attn_impl: str = "sdpa", device=None, dtype=None) -> CrossEncoder:
    """A folder → CrossEncoder in eval mode. A ...ForSequenceClassification folder loads its head, every
    tensor checked; a bare encoder folder (BertModel, XLMRobertaModel) gets a fresh head to fine-tune."""
    directory = resolve_model_path(path) if is_hub_id(str(path)) else Path(path)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is this a model folder?")
    raw = read_json(directory / CONFIG_NAME)
    config = BertConfig.from_json(directory / CONFIG_NAME)
    task = [a for a in raw.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if task and task[0] != ARCHITECTURES[config.model_type]:
        raise ValueError(f"{directory}: architectures {task[0]} with model_type {config.model_type!r}; minibge reads "
                         f"{ARCHITECTURES[config.model_type]} for that model_type")
    num_labels = len(raw["id2label"]) if isinstance(raw.get("id2label"), dict) else int(raw.get("num_labels", 1))
    model = CrossEncoder(config, num_labels, attn_impl, raw.get("classifier_dropout"))

    state = read_state_dict(directory)
    head_state = {name: t for name, t in state.items() if name.startswith("classifier.")}
    encoder_state = normalize_names({name: t for name, t in state.items() if not name.startswith("classifier.")})
    if task and not head_state:
        raise ValueError(f"{directory}: config.json says {task[0]}, but the weights hold no classifier.* tensors")
    has_pooler = any(name.startswith("pooler.") for name in encoder_state)
    if config.model_type == "xlm-roberta" and has_pooler:
        logger.info("%s: dropping the encoder's pooler (XLMRobertaForSequenceClassification has none)", directory)
        encoder_state = {n: t for n, t in encoder_state.items() if not n.startswith("pooler.")}
    elif config.model_type == "bert" and not has_pooler:  # the head reads the pooler: a fresh one
        model.encoder.pooler = None
    load_state_into(model.encoder, encoder_state, source=str(directory))
    if model.encoder.pooler is None and config.model_type == "bert":
        model.encoder.pooler = Pooler(config)
        model.encoder.pooler.apply(model.encoder._init_weights)
        logger.info("%s has no pooler: a fresh one feeds the classifier", directory)
    if head_state:
        copy_checked(model.head, head_state, str(directory), model.head_names(), what=f"a {ARCHITECTURES[config.model_type]} head")
    else:
        logger.info("%s holds a bare encoder: the cross-encoder head is fresh (random); fine-tune it", directory)
    return model.to(device=device, dtype=dtype).eval()


# -----------------------------------------------------------------------------
# Scoring pairs: tokenizer + cross-encoder

def check_pairs(pairs) -> list:
    """A list of (query, passage) string pairs, or a TypeError naming the first bad one."""
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of (query, passage) pairs, got {type(pairs).__name__}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise TypeError(f"pairs[{i}] must be a (query, passage) pair of two str, got {pair!r:.80}")
    return list(pairs)


class Reranker:
    """A tokenizer + a CrossEncoder: (query, passage) pairs → scores, batched longest first."""

    def __init__(self, model: CrossEncoder, tokenizer: Tokenizer, max_length: int = 512, name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = min(max_length, model.config.max_sequence_length)
        self.name = name

    def __repr__(self):
        return f"Reranker({self.name!r}, {ARCHITECTURES[self.model.config.model_type]}, max_length={self.max_length})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, pairs, max_length: int | None = None, query_max_length: int | None = None) -> dict:
        """Pairs → {"input_ids", "attention_mask", "token_type_ids"} (B, T) on the model's device."""
        max_length = self.max_length if max_length is None else min(max_length, self.max_length)
        batch = self.tokenizer.pad_pairs(self.tokenizer.encode_pairs(check_pairs(pairs), max_length, query_max_length))
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def logits(self, batch: dict) -> torch.Tensor:
        """The differentiable path, for training: a batch from tokenize → (B,) the first label's logit."""
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[:, 0]

    @torch.inference_mode()
    def score(self, pairs, batch_size: int = 128, max_length: int | None = None, query_max_length: int | None = None,
              normalize: bool = False) -> list[float]:
        """One float per pair, in input order: the logit, or sigmoid(logit) with normalize.

        As FlagEmbedding does: every pair is tokenized first, then sorted by token count, longest first
        (little padding per batch; an out-of-memory error surfaces on the first batch), cut into batches
        of batch_size pairs, and the scores are put back in input order.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        max_length = self.max_length if max_length is None else min(max_length, self.max_length)
        encoded = self.tokenizer.encode_pairs(check_pairs(pairs), max_length, query_max_length)
        scores = np.empty(len(encoded), dtype=np.float64)
        for members in length_sorted_batches([len(ids) for ids, _ in encoded], batch_size):
            inputs = {k: v.to(self.device) for k, v in self.tokenizer.pad_pairs([encoded[i] for i in members]).items()}
            logits = self.logits(inputs).float()
            scores[members] = (torch.sigmoid(logits) if normalize else logits).cpu().numpy()
        return scores.tolist()

    def save_pretrained(self, directory) -> Path:
        """The cross-encoder (official layout) and the tokenizer: transformers' AutoModelForSequenceClassification
        and AutoTokenizer, and load_reranker, read the folder back."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory


def load_reranker(name_or_path, device=None, dtype=None, attn_impl: str = "sdpa", max_length: int | None = None) -> Reranker:
    """A cross-encoder folder (or a bare encoder, which gets a fresh head) or Hub id → a Reranker."""
    folder = resolve_model_path(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_cross_encoder(folder, attn_impl=attn_impl, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(folder)
    reranker = Reranker(model, tokenizer, max_length or tokenizer.model_max_length, name=str(name_or_path))
    logger.info("loaded %r", reranker)
    return reranker
