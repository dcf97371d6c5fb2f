"""The divergence lab: each mistake is the mistake it claims to be, and the lab runs end to end.

The first group checks mistakes against transformers configured the same wrong way (a tiny random
BERT, so it is fast and needs no weights); the second runs the lab on the real all-MiniLM-L6-v2 and a
handful of STS-B pairs; the last runs `minibge lab` itself.
"""
import pytest
import torch
from conftest import TINY, diff_report, hf_reference_model, official_state_dict, random_batch, require_module

from minibge import BertConfig, BertModel, Embedder, load_embedder
from minibge.cli import main
from minibge.evaluate.data import load_sts_csv
from minibge.lab import MISTAKES, applicable, format_page, format_table, run_lab, with_mistake
from minibge.weights import load_state_into

MISTAKE = {m.name: m for m in MISTAKES}
AFTER_THE_ENCODER = {"dropout", "pooler", "mean-for-cls", "cls-for-mean", "no-l2"}  # hidden state untouched (dropout aside)


# -----------------------------------------------------------------------------
# Each mistake against transformers made wrong in the same way

def tiny_pair(**hf_changes):
    """(minibge Embedder over a tiny random BERT, a transformers BertModel with the same weights and
    `hf_changes` applied to its config)."""
    transformers = require_module("transformers")
    # a wide init (std 0.5, not 0.02) puts the feed-forward inputs where tanh and erf GELU differ
    config = BertConfig(**TINY, initializer_range=0.5)
    hf_model = hf_reference_model(config, seed=2)
    model = BertModel(config).eval()
    load_state_into(model, official_state_dict(hf_model))
    wrong_config = transformers.BertConfig(**{**hf_model.config.to_dict(), **hf_changes})
    wrong_hf = transformers.BertModel(wrong_config).eval()
    wrong_hf.load_state_dict(hf_model.state_dict())
    return Embedder(model, tokenizer=None), wrong_hf


# (mistake, the same mistake as a transformers config change, ... as transformers inputs, least effect it must have)
@pytest.mark.parametrize("name, hf_changes, hf_inputs, min_change", [
    ("tanh-gelu", {"hidden_act": "gelu_pytorch_tanh"}, lambda ids, mask: {}, 1e-4),
    ("eps-1e-5", {"layer_norm_eps": 1e-5}, lambda ids, mask: {}, 1e-6),  # tiny where token variances are ~1
    ("causal", {"is_decoder": True}, lambda ids, mask: {}, 1e-2),  # a decoder BertModel masks the future
    ("mask-polarity", {}, lambda ids, mask: {"attention_mask": 1 - mask}, 1e-2),
    ("no-mask", {}, lambda ids, mask: {"attention_mask": None}, 1e-2),
    ("positions+1", {}, lambda ids, mask: {"position_ids": torch.arange(1, ids.shape[1] + 1)[None]}, 1e-2),
])
def test_mistake_matches_transformers_made_wrong_the_same_way(name, hf_changes, hf_inputs, min_change):
    embedder, wrong_hf = tiny_pair(**hf_changes)
    ids, mask, _ = random_batch(embedder.model.config, batch_size=3, seq_len=12, seed=5)
    mask[1:, -1] = 0  # at least two rows with padding, one full row (and ids of 0 there, as a tokenizer pads)
    ids = ids * mask
    wrong = with_mistake(embedder, MISTAKE[name])
    with torch.no_grad():
        ours = wrong.model(ids, mask)
        ref = wrong_hf(**{"input_ids": ids, "attention_mask": mask, **hf_inputs(ids, mask)}).last_hidden_state
        correct = embedder.model(ids, mask)
    # rows whose every key is masked (inverted polarity on a full row) are undefined; compare the others
    rows = (1 - mask).any(dim=1) if name == "mask-polarity" else torch.ones(len(ids), dtype=torch.bool)
    real = mask.bool() & rows[:, None]
    assert torch.allclose(ours[real], ref[real], atol=1e-4), f"{name}: {diff_report(ours[real], ref[real])}"
    assert (ours - correct)[real].abs().max() > min_change, f"{name} changed too little: {diff_report(ours[real], correct[real])}"


def test_no_token_type_and_pre_ln_mean_what_they_say():
    embedder, _ = tiny_pair()
    model = embedder.model
    ids, mask, _ = random_batch(model.config, batch_size=2, seq_len=10, seed=6)
    with torch.no_grad():
        # no token type: the embedding output is LN(word + position), computed here by hand
        e = model.embeddings
        expected = e.norm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(10))[None])
        got = with_mistake(embedder, MISTAKE["no-token-type"]).model.embeddings(ids)
        assert torch.allclose(got, expected, atol=1e-6), diff_report(got, expected)
        # pre-LN: one layer's output is x + Attn(LN1 x) + FFN(LN2(...)), written out by hand
        layer, x = model.layers[0], torch.randn(2, 10, model.config.hidden_size)
        a = x + layer.attention(layer.attention_norm(x))[0]
        expected = a + layer.feed_forward(layer.ffn_norm(a))
        got, _ = with_mistake(embedder, MISTAKE["pre-ln"]).model.layers[0](x)
        assert torch.allclose(got, expected, atol=1e-6), diff_report(got, expected)


def test_a_mistake_never_touches_the_original():
    embedder, _ = tiny_pair()
    ids, mask, _ = random_batch(embedder.model.config, batch_size=2, seq_len=8, seed=7)
    with torch.no_grad():
        before = embedder.model(ids, mask)
        for mistake in MISTAKES:
            with_mistake(embedder, mistake)
        after = embedder.model(ids, mask)
    assert torch.equal(before, after) and not embedder.model.training and embedder.pooling == "cls"


def test_pooling_mistakes_follow_the_model():
    cls_model = Embedder(BertModel(BertConfig(**TINY)), tokenizer=None, pooling="cls")
    mean_model = Embedder(BertModel(BertConfig(**TINY)), tokenizer=None, pooling="mean")
    assert {m.name for m in applicable(cls_model)} - {m.name for m in applicable(mean_model)} == {"mean-for-cls"}
    assert {m.name for m in applicable(mean_model)} - {m.name for m in applicable(cls_model)} == {"cls-for-mean"}


# -----------------------------------------------------------------------------
# The lab on the real checkpoint, a few pairs

@pytest.fixture(scope="module")
def lab_rows(minilm_dir, shared_data):
    embedder = load_embedder(minilm_dir, device="cpu")
    s1, s2, gold = (column[:8] for column in load_sts_csv(shared_data / "stsbenchmark" / "sts-test.csv"))
    return run_lab(embedder, s1, s2, gold, probe_size=6)


@pytest.mark.slow  # real checkpoint, every mistake
def test_lab_measures_every_applicable_mistake_on_minilm(lab_rows):
    rows = {row["name"]: row for row in lab_rows}
    assert lab_rows[0]["name"] == "correct" and len(lab_rows) == 1 + len(MISTAKES) - 1  # all but mean-for-cls
    base = rows["correct"]
    assert base["hidden_max_diff"] == 0 and base["vector_cosine"] == pytest.approx(1)
    for name, row in rows.items():
        if name == "correct":
            continue
        if name in AFTER_THE_ENCODER - {"dropout"}:
            assert row["hidden_max_diff"] == 0, f"{name} acts after the encoder but moved it by {row['hidden_max_diff']}"
        else:
            assert row["hidden_max_diff"] > 1e-4, f"{name}: hidden states unchanged ({row['hidden_max_diff']:.2e})"
        if name != "no-l2":
            assert row["vector_cosine"] < 1 - 1e-8, f"{name}: sentence vectors unchanged (cos {row['vector_cosine']})"
    # a cosine ignores the vectors' lengths: the missing normalisation changes nothing there
    assert rows["no-l2"]["spearman_cosine"] == pytest.approx(base["spearman_cosine"], abs=1e-9)
    assert base["spearman_dot"] == pytest.approx(base["spearman_cosine"], abs=1e-6)  # unit vectors: dot = cosine
    assert rows["pre-ln"]["spearman_cosine"] < base["spearman_cosine"] - 10, format_table(lab_rows)


def test_lab_page_names_its_command(lab_rows):
    page = format_page(lab_rows, "all-MiniLM-L6-v2", 8, 1379, "minibge lab --limit 8")
    assert "minibge lab --limit 8" in page and "first 8 of 1379" in page and " UTC on " in page
    assert all(m.title in page for m in MISTAKES if m.name != "mean-for-cls")


@pytest.mark.slow  # real checkpoint, every mistake
def test_lab_command_writes_the_page(minilm_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "lab.md"
    status = main(["lab", "-m", str(minilm_dir), "--data-dir", str(shared_data), "--limit", "6",
                   "--only", "tanh-gelu", "--only", "no-l2", "--output", str(out)])
    assert status == 0
    table = capsys.readouterr().out
    assert "tanh GELU instead of erf" in table and "no L2 normalisation" in table and "pre-LN" not in table
    page = out.read_text()
    assert f"minibge lab -m {minilm_dir} --output {out} --limit 6 --only tanh-gelu --only no-l2" in page


def test_lab_command_rejects_a_missing_data_folder(tmp_path, capsys):
    assert main(["lab", "--data-dir", str(tmp_path)]) == 1
    assert "STS-B test file not found" in capsys.readouterr().err
