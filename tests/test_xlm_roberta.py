"""XLM-RoBERTa (BGE-M3, the BGE rerankers' encoder) against transformers.XLMRobertaModel, and its tokenizer
against transformers' XLMRobertaTokenizer (issue 20, items 1-2).

The checkpoints are random, in the official layouts (what transformers' save_pretrained writes, and the
`roberta.` names of a task model), with the shapes of bge-reranker-base and bge-m3 shrunk to two layers
and a small vocabulary; LayerNorms perturbed. Batches are right-padded with <pad> = 1 to random lengths.
"""
import dataclasses

import pytest
import torch
from conftest import diff_report, require_module
from hypothesis import given, settings
from hypothesis import strategies as st
from rerank_fixtures import flagembedding_pair, hf_xlmr_model, random_xlmr_batch, shrunk, write_xlmr_tokenizer

import minibge
from minibge import BertModel
from minibge.weights import load_state_into, official_names

transformers = require_module("transformers")

SHAPES = ["bge-reranker-base", "bge-m3"]


def reference(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).last_hidden_state


def real_diff(ours, ref, mask):
    real = mask.bool()  # padded rows are garbage in both: real tokens only
    return (ours - ref)[real].abs().max().item()


@pytest.fixture(scope="module", params=SHAPES)
def checkpoint(request, tmp_path_factory):
    """(folder written by transformers' save_pretrained, the transformers model, its config)."""
    config = shrunk(request.param)
    hf_model = hf_xlmr_model(config)
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder)
    return folder, hf_model, config


def test_presets_are_xlm_roberta_shapes():
    base, m3 = minibge.preset("BAAI/bge-reranker-base"), minibge.preset("bge-m3")
    assert (base.max_position_embeddings, base.max_sequence_length, base.position_offset) == (514, 512, 2)
    assert (m3.max_position_embeddings, m3.max_sequence_length, m3.hidden_size) == (8194, 8192, 1024)
    assert (base.vocab_size, base.type_vocab_size, base.layer_norm_eps, base.pad_token_id) == (250002, 1, 1e-5, 1)
    assert base.to_dict()["architectures"] == ["XLMRobertaModel"] and base.to_dict()["model_type"] == "xlm-roberta"


def test_config_refuses_an_unknown_model_type():
    with pytest.raises(ValueError, match="model_type must be one of"):
        dataclasses.replace(minibge.preset("bge-m3"), model_type="roberta-prelayernorm")


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_last_hidden_state_matches_transformers(checkpoint, attn_impl):
    folder, hf_model, config = checkpoint
    model = minibge.load_model(folder, attn_impl=attn_impl)
    assert model.config.model_type == "xlm-roberta" and model.config.layer_norm_eps == 1e-5
    ids, mask = random_xlmr_batch(config, batch_size=5, seq_len=23, seed=3)
    with torch.no_grad():
        ours = model(ids, mask)
    ref = reference(hf_model, ids, mask)
    assert real_diff(ours, ref, mask) <= 1e-4, diff_report(ours[mask.bool()], ref[mask.bool()])


def test_bert_positions_fail_the_comparison(checkpoint):
    """The trap: positions 0..T-1 (BERT's rule) instead of counting from padding_idx + 1."""
    folder, hf_model, config = checkpoint
    model = minibge.load_model(folder)
    ids, mask = random_xlmr_batch(config, batch_size=5, seq_len=23, seed=3)
    model.embeddings.position_offset = 0  # what a BERT-only re-implementation does
    with torch.no_grad():
        wrong = model(ids, mask)
    assert real_diff(wrong, reference(hf_model, ids, mask), mask) > 1e-2


def test_positions_count_real_tokens_from_padding_idx_plus_one():
    config = shrunk("bge-reranker-base")
    model = BertModel(config)
    ids = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 7, 1, 8, 2, 1]])  # a <pad> id inside the second is not counted
    positions = model.embeddings.position_ids(ids, ids.shape[1], ids.device)
    assert positions.tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 1, 4, 5, 1]]
    hf_positions = transformers.models.xlm_roberta.modeling_xlm_roberta.XLMRobertaEmbeddings \
        .create_position_ids_from_input_ids(ids, padding_idx=1)
    assert positions.tolist() == hf_positions.tolist()


def test_too_long_for_514_positions_is_refused():
    config = shrunk("bge-reranker-base")
    model = BertModel(config).eval()
    assert config.max_sequence_length == 512
    model(torch.full((1, 512), 5))  # 512 tokens use positions 2..513: the last row of the table
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        model(torch.full((1, 513), 5))


def test_task_model_names_under_roberta_load_exactly(checkpoint):
    """A ...ForSequenceClassification stores the encoder under `roberta.`; the key map takes it, and
    one tensor too many or too few is refused by name."""
    _, hf_model, config = checkpoint
    state = {f"roberta.{k}": v for k, v in hf_model.state_dict().items()}
    model = BertModel(config)
    load_state_into(model, state)
    ids, mask = random_xlmr_batch(config, 3, 11, seed=1)
    with torch.no_grad():
        assert real_diff(model(ids, mask), reference(hf_model, ids, mask), mask) <= 1e-4
    with pytest.raises(ValueError, match="missing"):
        load_state_into(BertModel(config), {k: v for k, v in state.items() if "layer.1.output.dense" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        load_state_into(BertModel(config), {**state, "roberta.encoder.layer.9.output.dense.weight": torch.zeros(1)})
    assert set(official_names(model).values()) == {k for k in hf_model.state_dict() if not k.endswith("_ids")}


def test_save_pretrained_reloads_in_transformers(checkpoint, tmp_path):
    folder, hf_model, config = checkpoint
    model = minibge.load_model(folder)
    minibge.save_pretrained(model, tmp_path / "out")
    reloaded, info = transformers.AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(reloaded).__name__ == "XLMRobertaModel"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = random_xlmr_batch(config, 3, 11, seed=2)
    assert real_diff(reference(reloaded.eval(), ids, mask), reference(hf_model, ids, mask), mask) <= 1e-6


def test_fast_encoder_follows_the_position_rule(checkpoint):
    """fast/encoder.py packs real tokens; its positions must be XLM-R's, right or left padded."""
    from minibge.fast import FastEncoder

    folder, hf_model, config = checkpoint
    model = minibge.load_model(folder)
    fast = FastEncoder(model)
    ids, mask = random_xlmr_batch(config, batch_size=5, seq_len=17, seed=4)
    with torch.no_grad():
        ours = fast(ids, mask)
    ref = reference(hf_model, ids, mask)
    assert real_diff(ours, ref, mask) <= 1e-4, diff_report(ours[mask.bool()], ref[mask.bool()])
    # left padding: transformers counts the ids, so the first real token is still padding_idx + 1
    left_ids = torch.stack([torch.roll(row, int((row == 1).sum())) for row in ids])
    left_mask = (left_ids != 1).long()
    with torch.no_grad():
        ours = fast(left_ids, left_mask)
    assert real_diff(ours, reference(hf_model, left_ids, left_mask), left_mask) <= 1e-4


@pytest.mark.parametrize("fast", [True, False])
def test_embedder_encode_matches_transformers(checkpoint, tmp_path, fast):
    """The whole pipeline on an XLM-R folder: tokenizer.json (Unigram) → encoder → <s> vector → L2."""
    folder, hf_model, config = checkpoint
    hf_tokenizer = write_xlmr_tokenizer(folder)
    texts = ["the giant panda", "机器学习很有趣 😀", "what is a bear species endemic to China? " * 3, "x"]
    embedder = minibge.load_embedder(folder, fast=fast, device="cpu")
    assert (embedder.fast_path_blocker() is None) == fast
    ours = torch.from_numpy(embedder.encode(texts, batch_size=3))
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    ref = torch.nn.functional.normalize(reference(hf_model, batch["input_ids"], batch["attention_mask"])[:, 0], dim=-1)
    assert (ours - ref).abs().max().item() <= 1e-4, diff_report(ours, ref)


# -----------------------------------------------------------------------------
# The tokenizer: a SentencePiece Unigram tokenizer.json, id for id with transformers

@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xlmr-tokenizer")
    write_xlmr_tokenizer(folder)
    return minibge.Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_tokenizer_layout_is_xlm_roberta(tokenizers_pair):
    ours, hf = tokenizers_pair
    assert [ours._tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert ours._tok.token_to_id("<mask>") == ours.vocab_size - 1
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (0, 2, 1)
    assert ours.mask_token_id == hf.mask_token_id
    assert ours.encode_batch(["the cat"], 512)[0] == hf("the cat")["input_ids"]


# characters of every kind, and special tokens typed as text (matched before normalisation on both sides)
TEXT = st.lists(st.sampled_from(list("the cat sat naïve café 熊猫是中国 😀🎉, ?!\t\n") + ["<s>", "<mask>", " </s>"]),
                max_size=60).map("".join)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), max_length=st.integers(4, 40))
def test_ids_match_transformers(tokenizers_pair, texts, max_length):
    ours, hf = tokenizers_pair
    assert ours.encode_batch(texts, max_length) == \
        hf(texts, max_length=max_length, truncation=True)["input_ids"]


@settings(max_examples=60, deadline=None)
@given(query=TEXT.filter(bool), passage=TEXT.filter(bool), max_length=st.integers(10, 40))
def test_pairs_match_transformers(tokenizers_pair, query, passage, max_length):
    ours, hf = tokenizers_pair
    query_ids = hf(query, add_special_tokens=False, max_length=max_length * 3 // 4, truncation=True)["input_ids"]
    if len(query_ids) + 4 > max_length:  # no room for the passage: transformers returns too many tokens, we refuse
        with pytest.raises(ValueError, match="leave no room for the passage"):
            ours.encode_pairs([(query, passage)], max_length)
        return
    (ids, types), = ours.encode_pairs([(query, passage)], max_length)
    assert ids == flagembedding_pair(hf, query, passage, max_length, max_length * 3 // 4)["input_ids"]
    assert types == [0] * len(ids)


def test_empty_texts_still_make_a_pair(tokenizers_pair):
    """transformers' tokenizer reads an empty second text as "no pair" (hence the filter above);
    FlagEmbedding's token-level pairing, and ours, keep the pair template."""
    ours, _ = tokenizers_pair
    assert ours.encode_pairs([("", "")], 10) == [([0, 2, 2, 2], [0, 0, 0, 0])]


def test_pair_layout_and_truncation(tokenizers_pair):
    ours, hf = tokenizers_pair
    q, p = "what is a panda?", "The giant panda is a bear species endemic to China. " * 5
    (ids, _), = ours.encode_pairs([(q, p)], max_length=20)
    q_ids = hf(q, add_special_tokens=False)["input_ids"]
    assert ids[:len(q_ids) + 3] == [0, *q_ids, 2, 2]  # <s> A </s></s>: the query whole
    assert len(ids) == 20 and ids[-1] == 2            # the passage cut to fit, </s> kept
    (ids, _), = ours.encode_pairs([(p, q)], max_length=20, query_max_length=6)
    assert ids[:9] == [0, *hf(p, add_special_tokens=False)["input_ids"][:6], 2, 2]
    with pytest.raises(ValueError, match=r"pairs\[0\]: .* leave no room for the passage"):
        ours.encode_pairs([(p, q)], max_length=20, query_max_length=17)
    with pytest.raises(TypeError, match="wrap a single pair in a list"):
        ours.encode_pairs((q, p), max_length=20)


def test_bert_pairs_have_segments(minilm_dir):
    """BERT's pair: [CLS] A [SEP] B [SEP] with token types 0 then 1, as transformers' tokenizer gives them."""
    ours = minibge.Tokenizer.from_pretrained(minilm_dir)
    hf = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    for query, passage, query_max_length in [("what is a panda?", "a bear " * 40, None),
                                             ("a long question about bears " * 4, "a bear " * 40, 6)]:
        (ids, types), = ours.encode_pairs([(query, passage)], max_length=32, query_max_length=query_max_length)
        ref = flagembedding_pair(hf, query, passage, 32, query_max_length or 24)
        assert ids == ref["input_ids"] and len(ids) == 32
        n_query = len(hf(query, add_special_tokens=False, max_length=query_max_length or 24,
                         truncation=True)["input_ids"])
        assert types == [0] * (n_query + 2) + [1] * (len(ids) - n_query - 2)
        assert types == ref["token_type_ids"]
