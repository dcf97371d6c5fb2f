"""Cross-encoders (minibge/reranker.py) and FlagReranker against transformers' AutoModelForSequenceClassification
(issue 20, item 3): a BERT (BertForSequenceClassification, the ms-marco MiniLM layout) and an XLM-R
(XLMRobertaForSequenceClassification, bge-reranker-base's layout, shrunk) random checkpoint, heads and
LayerNorms perturbed, written by transformers' own save_pretrained.
"""
import json

import pytest
import torch
from conftest import diff_report, require_module
from rerank_fixtures import (flagembedding_pair, hf_cross_encoder, random_xlmr_batch, shrunk, write_bert_tokenizer,
                             write_xlmr_tokenizer)

import minibge
from minibge import BertConfig, FlagReranker
from minibge.reranker import load_cross_encoder

transformers = require_module("transformers")

# a BERT cross-encoder small enough for the CPU, with all-MiniLM-L6-v2's real WordPiece vocabulary
BERT = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
KINDS = ["bert", "xlm-roberta"]


def config_for(kind):
    return BERT if kind == "bert" else shrunk("bge-reranker-base")


@pytest.fixture(scope="module", params=KINDS)
def cross_encoder(request, tmp_path_factory, minilm_dir):
    """(folder with weights and tokenizer, transformers model, transformers tokenizer, kind)."""
    kind = request.param
    hf_model = hf_cross_encoder(config_for(kind), seed=1)
    folder = tmp_path_factory.mktemp(kind)
    hf_model.save_pretrained(folder)
    if kind == "bert":
        write_bert_tokenizer(folder, minilm_dir)
    else:
        write_xlmr_tokenizer(folder)
    return folder, hf_model, transformers.AutoTokenizer.from_pretrained(folder), kind


def random_batch(config, seed=0):
    if config.model_type == "xlm-roberta":
        ids, mask = random_xlmr_batch(config, 5, 19, seed)
        return ids, mask, torch.zeros_like(ids)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, config.vocab_size, (5, 19), generator=gen)
    lengths = torch.tensor([19, 4, 11, 7, 16])
    mask = (torch.arange(19)[None] < lengths[:, None]).long()
    types = ((torch.arange(19)[None] >= lengths[:, None] // 2) & mask.bool()).long()  # segment B in the second half
    return ids * mask, mask, types


def hf_logits(hf_model, ids, mask, types):
    kwargs = {"token_type_ids": types} if hf_model.config.model_type == "bert" else {}
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_logits_match_transformers(cross_encoder, attn_impl):
    folder, hf_model, _, kind = cross_encoder
    model = load_cross_encoder(folder, attn_impl=attn_impl)
    assert type(model.head).__name__ == ("BertClassifierHead" if kind == "bert" else "RobertaClassifierHead")
    assert (model.encoder.pooler is not None) == (kind == "bert")  # XLMRobertaForSequenceClassification has none
    ids, mask, types = random_batch(model.config)
    with torch.no_grad():
        ours = model(ids, mask, types)
    ref = hf_logits(hf_model, ids, mask, types)
    assert ours.shape == ref.shape == (5, 1)
    assert (ours - ref).abs().max().item() <= 1e-4, diff_report(ours, ref)


def test_a_swapped_head_fails_the_comparison(cross_encoder):
    """The head is where BERT and XLM-R cross-encoders differ: reading the pooler / <s> the other way is wrong."""
    folder, hf_model, _, kind = cross_encoder
    model = load_cross_encoder(folder)
    ids, mask, types = random_batch(model.config)
    with torch.no_grad():
        hidden = model.encoder(ids, mask, types)
        if kind == "bert":  # skip the pooler, as an XLM-R head would
            wrong = model.head.out_proj(hidden[:, 0])
        else:               # a dense without tanh
            wrong = model.head.out_proj(model.head.dense(hidden[:, 0]))
    assert (wrong - hf_logits(hf_model, ids, mask, types)).abs().max().item() > 1e-2


def test_save_reloads_in_transformers_with_the_same_logits(cross_encoder, tmp_path):
    folder, hf_model, _, kind = cross_encoder
    model = load_cross_encoder(folder)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [{"bert": "BertForSequenceClassification",
                                        "xlm-roberta": "XLMRobertaForSequenceClassification"}[kind]]
    reloaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out",
                                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded) is type(hf_model) and reloaded.config.num_labels == 1
    ids, mask, types = random_batch(model.config, seed=5)
    ref = hf_logits(hf_model, ids, mask, types)
    again = hf_logits(reloaded.eval(), ids, mask, types)
    assert (again - ref).abs().max().item() <= 1e-6, diff_report(again, ref)
    back = load_cross_encoder(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(ids, mask, types), model(ids, mask, types))


def test_bare_encoder_gets_a_fresh_head(tmp_path):
    """A BertModel / XLMRobertaModel folder (an embedder) is a starting point for fine-tuning a reranker."""
    for config in (BERT, shrunk("bge-reranker-base")):
        encoder = minibge.BertModel(config)
        minibge.save_pretrained(encoder, tmp_path / config.model_type)
        model = load_cross_encoder(tmp_path / config.model_type)
        assert model.num_labels == 1 and model.head.out_proj.out_features == 1
        kept = model.encoder.state_dict()
        for name, tensor in encoder.state_dict().items():
            if name.startswith("pooler.") and config.model_type == "xlm-roberta":
                assert name not in kept  # XLMRobertaForSequenceClassification has no pooler
                continue
            assert torch.equal(kept[name], tensor), name


def test_bad_folders_are_refused(cross_encoder, tmp_path):
    folder, hf_model, _, kind = cross_encoder
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    head = next(name for name in state if name.startswith("classifier.") and name.endswith("weight"))
    save_file({k: v for k, v in state.items() if k != head}, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        load_cross_encoder(bad)
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, bad / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="hold no classifier"):
        load_cross_encoder(bad)
    other = "BertForSequenceClassification" if kind == "xlm-roberta" else "XLMRobertaForSequenceClassification"
    (bad / "config.json").write_text(json.dumps({**config, "architectures": [other]}))
    with pytest.raises(ValueError, match="minibge reads"):
        load_cross_encoder(bad)


# -----------------------------------------------------------------------------
# FlagReranker.compute_score: the same numbers as transformers on FlagEmbedding's truncated pairs

QUERY = "what is a panda?"
PASSAGES = ["hi", "The giant panda is a bear species endemic to China. " * 20, "熊猫是中国特有的熊科动物 😀",
            "query passage score"]


def reference_scores(hf_model, hf_tokenizer, pairs, max_length, query_max_length):
    """transformers' model on FlagEmbedding's pair encoding, one pair at a time (no batching to get wrong)."""
    scores = []
    for query, passage in pairs:
        encoded = flagembedding_pair(hf_tokenizer, query, passage, max_length, query_max_length)
        ids = torch.tensor([encoded["input_ids"]])
        types = torch.tensor([encoded["token_type_ids"]]) if "token_type_ids" in encoded else torch.zeros_like(ids)
        scores.append(hf_logits(hf_model, ids, torch.ones_like(ids), types)[0, 0].item())
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("normalize", [False, True])
def test_compute_score_matches_transformers(cross_encoder, normalize):
    folder, hf_model, hf_tokenizer, _ = cross_encoder
    reranker = FlagReranker(str(folder), max_length=40, normalize=normalize, devices="cpu")
    pairs = [(QUERY, p) for p in PASSAGES] + [(PASSAGES[1], QUERY)]  # the last: a long query, cut to 3/4 of 40
    scores = reranker.compute_score(pairs, batch_size=2)
    assert isinstance(scores, list) and len(scores) == len(pairs) and all(isinstance(s, float) for s in scores)
    ref = reference_scores(hf_model, hf_tokenizer, pairs, 40, 30)
    if normalize:
        ref = torch.sigmoid(ref)
    assert (torch.tensor(scores) - ref).abs().max().item() <= 1e-4, diff_report(torch.tensor(scores), ref)
    one = reranker.compute_score([QUERY, PASSAGES[1]])  # one pair → one float
    assert isinstance(one, float) and abs(one - scores[1]) <= 1e-5


def test_compute_score_keeps_the_query_and_cuts_the_passage(cross_encoder):
    folder, hf_model, hf_tokenizer, _ = cross_encoder
    reranker = FlagReranker(str(folder), max_length=24, query_max_length=12, devices="cpu")
    long_query = "what is a giant panda and where does it live " * 3
    score = reranker.compute_score((long_query, PASSAGES[1]), normalize=True)
    ref = torch.sigmoid(reference_scores(hf_model, hf_tokenizer, [(long_query, PASSAGES[1])], 24, 12))
    assert abs(score - ref.item()) <= 1e-4
    (ids, _), = reranker.reranker.tokenizer.encode_pairs([(QUERY, PASSAGES[1])], 24)
    q = hf_tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and ids[1:1 + len(q)] == q  # the whole query, then as much passage as fits


def test_compute_score_order_and_batch_size_do_not_matter(cross_encoder):
    folder, *_ = cross_encoder
    reranker = FlagReranker(str(folder), max_length=48, devices="cpu")
    pairs = [(QUERY, p) for p in PASSAGES] * 3
    full = reranker.compute_score(pairs)
    for batch_size in (1, 5):
        assert torch.allclose(torch.tensor(reranker.compute_score(pairs, batch_size=batch_size)),
                              torch.tensor(full), atol=1e-5)
    assert torch.allclose(torch.tensor(reranker.compute_score(pairs[::-1])), torch.tensor(full[::-1]), atol=1e-5)


def test_compute_score_input_errors(cross_encoder):
    folder, *_ = cross_encoder
    reranker = FlagReranker(str(folder), devices="cpu")
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        reranker.compute_score([(QUERY, "a"), (QUERY, 3)])
    with pytest.raises(TypeError, match="pairs must be a list"):
        reranker.compute_score("a query")
    with pytest.raises(ValueError, match="trust_remote_code"):
        FlagReranker(str(folder), trust_remote_code=True)
    assert reranker.compute_score([]) == []


def test_instructions_are_prepended(cross_encoder):
    folder, *_ = cross_encoder
    plain = FlagReranker(str(folder), devices="cpu")
    instructed = FlagReranker(str(folder), devices="cpu", query_instruction_for_rerank="A: ",
                              passage_instruction_for_rerank="B: ")
    assert instructed.compute_score([QUERY, "hi"]) == pytest.approx(plain.compute_score(["A: " + QUERY, "B: hi"]), abs=1e-6)


def test_gradients_match_transformers(cross_encoder):
    """Fine-tuning goes through the same gradients: every parameter's, including XLM-R's position table,
    whose padding row (padding_idx) gets none, as in transformers (a <pad> id among the attended tokens
    is the one case where that row would otherwise get a gradient)."""
    folder, hf_model, _, kind = cross_encoder
    model = load_cross_encoder(folder).train()
    hf = hf_cross_encoder(config_for(kind), seed=1).train()  # the same weights as the saved folder (same seed)
    ids, mask, types = random_batch(model.config, seed=7)
    ids[0, 3] = model.config.pad_token_id  # a <pad> id inside the attended text: its rows must get no gradient
    target = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5])[:, None]
    ((model(ids, mask, types) - target) ** 2).sum().backward()
    kwargs = {"token_type_ids": types} if kind == "bert" else {}
    ((hf(input_ids=ids, attention_mask=mask, **kwargs).logits - target) ** 2).sum().backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    from minibge.weights import PREFIXES, official_names

    names = {f"encoder.{ours}": PREFIXES[kind] + theirs for ours, theirs in official_names(model.encoder).items()}
    names.update({f"head.{ours}": theirs for ours, theirs in model.head_names().items()})
    worst = 0.0
    for name, param in model.named_parameters():
        ref = hf_grads[names[name]]
        ours = param.grad if param.grad is not None else torch.zeros_like(ref)
        worst = max(worst, ((ours - ref).norm() / ref.norm().clamp(min=1e-12)).item())
    assert worst <= 1e-4, f"largest relative gradient error {worst:.2e}"
    if kind == "xlm-roberta":
        position_grad = model.encoder.embeddings.position_embeddings.weight.grad
        assert position_grad[model.config.pad_token_id].abs().max() == 0
