"""Synthetic XLM-RoBERTa checkpoints and tokenizers in the official layouts, with transformers as the
reference (tests/test_xlm_roberta.py, tests/test_reranker.py, tests/train/test_train_rerank.py).

No XLM-R or reranker checkpoint is available offline, so every test builds one: random weights with
the shapes of bge-reranker-base / bge-m3 (fewer layers and a small vocabulary, for the CPU), LayerNorms
and heads pushed away from their init so a mis-wired one cannot hide, saved by transformers itself.
The tokenizer is a small SentencePiece-style Unigram trained here and saved by transformers'
XLMRobertaTokenizer, so its tokenizer.json has the official layout: <s> 0, <pad> 1, </s> 2, <unk> 3,
the pieces, <mask> last.
"""
import dataclasses
import json
from pathlib import Path

import torch
from conftest import TINY

from minibge import BertModel, Tokenizer, save_pretrained
from minibge.config import BertConfig, preset

# text the Unigram is trained on: English, accents, CJK, emoji, so that each kind has pieces
CORPUS = ["the cat sat on the mat", "what is a panda?", "The giant panda is a bear species endemic to China.",
          "hello world, how are you?", "机器学习很有趣", "熊猫是中国特有的熊科动物", "emoji 😀 🎉 are fun",
          "naïve café résumé", "BGE rerankers are cross-encoders", "query passage score"] * 10


def shrunk(name: str, layers: int = 2, vocab_size: int = 400) -> BertConfig:
    """An official XLM-R preset with fewer layers and a small vocabulary (the rest of its shape kept)."""
    return dataclasses.replace(preset(name), num_hidden_layers=layers, vocab_size=vocab_size,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(config: BertConfig, **extra):
    """The transformers config of the same shape (XLMRobertaConfig or BertConfig by model_type)."""
    import transformers

    values = {k: v for k, v in config.to_dict().items() if k != "architectures"}
    kind = transformers.XLMRobertaConfig if config.model_type == "xlm-roberta" else transformers.BertConfig
    return kind(**values, **extra)


def perturb(model, seed: int = 0):
    """LayerNorms away from 1/0 and every classification head away from its init (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "classifier" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def hf_xlmr_model(config: BertConfig, seed: int = 0, attn_implementation: str = "sdpa"):
    """transformers.XLMRobertaModel with this config and random, perturbed weights, in eval mode."""
    import transformers

    hf = hf_config(config)
    hf._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return perturb(transformers.XLMRobertaModel(hf)).eval()


def hf_cross_encoder(config: BertConfig, seed: int = 0, num_labels: int = 1):
    """transformers' ...ForSequenceClassification (XLM-R or BERT by model_type), random and perturbed."""
    import transformers

    hf = hf_config(config, num_labels=num_labels)
    kind = (transformers.XLMRobertaForSequenceClassification if config.model_type == "xlm-roberta"
            else transformers.BertForSequenceClassification)
    torch.manual_seed(seed)
    return perturb(kind(hf), seed).eval()


def random_xlmr_batch(config: BertConfig, batch_size: int, seq_len: int, seed: int = 0):
    """(input_ids, attention_mask): <s> ... </s> of random lengths, right-padded with <pad> = 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=gen)  # never a special id
    lengths = torch.randint(3, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0                                                   # <s>
    ids[torch.arange(batch_size), lengths - 1] = 2                  # </s>
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, config.pad_token_id))
    return ids, mask


def unigram_vocab(corpus=CORPUS, size: int = 300) -> list[tuple[str, float]]:
    """XLM-R's vocabulary layout: <s> <pad> </s> <unk>, then trained Unigram pieces, then <mask>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    pieces = json.loads(tok.to_str())["model"]["vocab"]  # [[piece, score], ...], the 4 specials first
    assert [p for p, _ in pieces[:4]] == ["<s>", "<pad>", "</s>", "<unk>"]
    return [(p, float(s)) for p, s in pieces] + [("<mask>", 0.0)]


def write_xlmr_tokenizer(directory: Path, model_max_length: int = 512):
    """Save a small XLM-R tokenizer with transformers' own XLMRobertaTokenizer; returns it."""
    import transformers

    tok = transformers.XLMRobertaTokenizer(vocab=unigram_vocab(), model_max_length=model_max_length)
    tok.save_pretrained(str(directory))
    return tok


def write_bert_tokenizer(directory: Path, minilm_dir: Path) -> None:
    """The real all-MiniLM-L6-v2 WordPiece files (BERT's layout), copied beside a random checkpoint."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(minilm_dir) / name, Path(directory) / name)


def flagembedding_pair(hf, query, passage, max_length, query_max_length):
    """FlagEmbedding's reranker input, from transformers' tokenizer: the query cut alone to query_max_length,
    then, in the pair, only the passage cut (transformers' truncation="only_second")."""
    q = hf(query, add_special_tokens=False)["input_ids"]
    p = hf(passage, add_special_tokens=False)["input_ids"]
    full = hf(query, passage)  # the pair template, untruncated
    specials = len(full["input_ids"]) - len(q) - len(p)
    if len(q) <= query_max_length and len(q) + specials < max_length:  # transformers does all of it
        return hf(query, passage, truncation="only_second", max_length=max_length)
    # a long query, or no room left for any passage token (transformers 5 refuses to cut a passage to
    # nothing; FlagEmbedding's prepare_for_model allowed it): cut by hand, specials where the template puts them
    cut_q, cut_p = q[:query_max_length], p[:max(0, max_length - specials - query_max_length)]
    layout = full["input_ids"]
    ids = layout[:1] + cut_q + layout[1 + len(q):1 + len(q) + specials - 2] + cut_p + layout[-1:]
    out = {"input_ids": ids}
    if "token_type_ids" in full:  # BERT: segment 0 up to the first [SEP], segment 1 after it
        first = 1 + len(cut_q) + specials - 2
        out["token_type_ids"] = [0] * first + [full["token_type_ids"][-1]] * (len(ids) - first)
    return out


WORDS = ("cat dog fish bird tree car road house river city blue red green small big old new fast slow "
         "paper model query answer protein cell gene drug trial").split()


def bert_folder(directory: Path) -> Path:
    """A tiny random BERT encoder (a bare BertModel, as an embedder has) with a small WordPiece vocabulary."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), ":", ".", ","]
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    save_pretrained(BertModel(BertConfig(**TINY)), directory)
    Tokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory
