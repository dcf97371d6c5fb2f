"""RetroMAE: the collator's masks, the MLM head and decoder against transformers / the original
RetroMAE computation, where the decoder's gradient may go, edge inputs, and saved checkpoints."""
import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, diff_report
from minibge import BertConfig, BertModel, Tokenizer
from minibge.retromae import IGNORE, RetroMAECollator, RetroMAEForPretraining

# words with and without "##" pieces in the MiniLM vocabulary ("unbelievably" → un ##bel ##ie ##va ##bly)
WORDS = ["the", "cells", "divide", "rapidly", "in", "unbelievably", "hyperactive", "tissues", ".", ",",
         "tokenization", "mitochondria", "a", "of", "immunohistochemistry", "protein", "x", "bge"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_pretrained(minilm_dir)


def tiny_config(tokenizer, **overrides):
    return BertConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 128, **overrides})


def hf_masked_lm(config, seed=0):
    """A transformers BertForMaskedLM (eager attention, eval) with random, perturbed weights and head."""
    import transformers

    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("predictions.bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tokenizer, tmp_path_factory):
    """(folder, hf BertForMaskedLM) saved by transformers itself: `bert.` prefix, no pooler, cls.* head."""
    config = tiny_config(tokenizer)
    hf_model = hf_masked_lm(config)
    folder = tmp_path_factory.mktemp("hf_mlm")
    hf_model.save_pretrained(folder)
    return folder, hf_model


def real_tokens(batch, b):
    return int(batch["encoder_attention_mask"][b].sum())


def words_of(tokenizer, ids):
    """Whole words from the token strings, computed independently of the collator."""
    words = []
    for pos, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        if token in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"):
            continue
        if token.startswith("##") and words and words[-1][-1] == pos - 1:
            words[-1].append(pos)
        else:
            words.append([pos])
    return words


# -----------------------------------------------------------------------------
# Mask properties

texts_strategy = st.lists(st.one_of(st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join), st.text(max_size=80)),
                          min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=texts_strategy, seed=st.integers(0, 2**31))
def test_mask_invariants(tokenizer, texts, seed):
    batch = RetroMAECollator(tokenizer, max_length=64, generator=torch.Generator().manual_seed(seed))(texts)
    ids, enc_labels = batch["decoder_input_ids"], batch["encoder_labels"]
    visible, dec_labels = batch["decoder_attention_mask"], batch["decoder_labels"]
    B, L = ids.shape
    assert visible.shape == (B, L, L) and visible.dtype == torch.bool
    for b in range(B):
        n = real_tokens(batch, b)
        row_ids = ids[b, :n].tolist()
        words = words_of(tokenizer, row_ids)
        in_a_word = torch.zeros(L, dtype=torch.bool)
        for word in words:
            in_a_word[word] = True
        masked = enc_labels[b] != IGNORE
        # encoder: only word tokens are masked, labels are the original ids, the rest is untouched
        assert not (masked & ~in_a_word).any(), "a special token or padding was masked for the encoder"
        assert torch.equal(enc_labels[b][masked], ids[b][masked])
        assert torch.equal(batch["encoder_input_ids"][b][~masked], ids[b][~masked])
        hidden = ~visible[b, :n, :n]
        assert hidden.diagonal().all(), "a decoder row may attend to its own position"
        assert not visible[b, n:].any() and not visible[b, :, n:].any(), "padding is visible to the decoder"
        others = torch.arange(n) != 0
        assert visible[b, :n, 0][others].all(), "a decoder row cannot see the sentence embedding (column 0)"
        assert visible[b, :n - 1, n - 1].all(), "[SEP] is hidden from a row other than its own"
        for word in words:  # whole words: all of a word or none of it, per mask
            chosen = masked[word]
            assert chosen.all() or not chosen.any(), f"encoder split the word at {word}"
            for i in range(n):
                rest = [p for p in word if p != i]  # row i also hides itself, which may cut its own word
                assert hidden[i, rest].all() or not hidden[i, rest].any(), f"decoder row {i} split the word {word}"
        expected_labels = ids[b].clone()
        expected_labels[[0, n - 1]] = IGNORE
        expected_labels[n:] = IGNORE
        assert torch.equal(dec_labels[b], expected_labels)


def test_masked_shares_on_long_inputs(tokenizer):
    """count = round(L·p) with L counting [CLS]/[SEP]; greedy whole words may fall a few tokens short."""
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(300)) for i in range(6)]
    batch = RetroMAECollator(tokenizer, max_length=256, generator=torch.Generator().manual_seed(0))(texts)
    L = batch["decoder_input_ids"].shape[1]
    encoder_share = (batch["encoder_labels"] != IGNORE).float().sum(1) / L  # every text fills all 256
    eye = torch.eye(L, dtype=torch.bool)
    decoder_share = ((~batch["decoder_attention_mask"]) & ~eye).float().sum(-1) / L  # (B, L), own position aside
    assert (encoder_share - 0.3).abs().max() < 0.02, f"encoder shares {encoder_share.tolist()}"
    assert (decoder_share - 0.5).abs().max() < 0.03, \
        f"decoder shares: min {decoder_share.min():.3f}, max {decoder_share.max():.3f}"
    # the 80/10/10 split, over all masked positions of the batch
    masked = batch["encoder_labels"] != IGNORE
    to_mask = (batch["encoder_input_ids"] == tokenizer.mask_token_id) & masked
    kept = (batch["encoder_input_ids"] == batch["decoder_input_ids"]) & masked
    assert abs(to_mask.sum() / masked.sum() - 0.8) < 0.05 and abs(kept.sum() / masked.sum() - 0.1) < 0.04


def test_seeded_reproducibility(tokenizer):
    texts = ["the cells divide rapidly in unbelievably hyperactive tissues"] * 3 + ["a protein"]

    def collate(seed, at_call=False):
        collator = RetroMAECollator(tokenizer, generator=None if at_call else torch.Generator().manual_seed(seed))
        return collator(texts, generator=torch.Generator().manual_seed(seed)) if at_call else collator(texts)

    first, again, other, per_call = collate(1), collate(1), collate(2), collate(1, at_call=True)
    for key in first:
        assert torch.equal(first[key], again[key]), f"{key} differs under the same seed"
        assert torch.equal(first[key], per_call[key]), f"{key}: a per-call generator does not act as the stored one"
    assert not torch.equal(first["decoder_attention_mask"], other["decoder_attention_mask"])


def test_collator_rejects_bad_settings(tokenizer):
    with pytest.raises(ValueError, match="encoder_mlm_probability"):
        RetroMAECollator(tokenizer, encoder_mlm_probability=0.0)
    with pytest.raises(ValueError, match="decoder_mlm_probability"):
        RetroMAECollator(tokenizer, decoder_mlm_probability=1.5)
    with pytest.raises(ValueError, match="empty list"):
        RetroMAECollator(tokenizer)([])
    with pytest.raises(TypeError):
        RetroMAECollator(tokenizer)("a string, not a list")
    no_mask = dataclasses.make_dataclass("NoMask", [("mask_token_id", object, None)])()
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        RetroMAECollator(no_mask)


# -----------------------------------------------------------------------------
# Equivalence with transformers and with the original RetroMAE computation

def test_mlm_head_matches_transformers(hf_checkpoint):
    folder, hf_model = hf_checkpoint
    model = RetroMAEForPretraining.from_pretrained(folder).eval()
    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.head(model.encoder(ids))
        ref = hf_model(input_ids=ids).logits
    assert (ours - ref).abs().max() <= 1e-4, diff_report(ours, ref)


def reference_losses(hf_model, hf_layer, batch, variant):
    """The losses the way staoxiao/RetroMAE (variant "retromae") or FlagEmbedding ("bge") compute them:
    BertForMaskedLM's own loss, transformers' BertLayer (its cross-attention sub-layer, queries h1,
    keys/values h2) as the decoder layer, the (B, L, L) 0/1 mask made additive as 4.x's
    get_extended_attention_mask did, and CrossEntropyLoss over every position."""
    lm_out = hf_model(batch["encoder_input_ids"], batch["encoder_attention_mask"], labels=batch["encoder_labels"],
                      output_hidden_states=True)
    cls_hiddens = lm_out.hidden_states[-1][:, :1]  # B 1 D
    embeddings = hf_model.bert.embeddings
    hiddens = torch.cat([cls_hiddens, embeddings(input_ids=batch["decoder_input_ids"])[:, 1:]], dim=1)
    B, L, D = hiddens.shape
    if variant == "retromae":
        query = embeddings.position_embeddings(torch.arange(L)[None]) + cls_hiddens
    else:
        query = embeddings(inputs_embeds=cls_hiddens.expand(B, L, D))
    mask = batch["decoder_attention_mask"][:, None].float()
    extended = (1.0 - mask) * torch.finfo(torch.float32).min  # (B, 1, L, L)
    attention, _ = hf_layer.crossattention(query, None, hiddens, extended)
    out = hf_layer.feed_forward_chunk(attention)
    logits = hf_model.cls(out)
    decoder_loss = torch.nn.CrossEntropyLoss()(logits.view(-1, logits.shape[-1]), batch["decoder_labels"].view(-1))
    return lm_out.loss, decoder_loss


def copy_decoder_into_hf_layer(decoder, hf_layer):
    pairs = {"attention.query": "crossattention.self.query", "attention.key": "crossattention.self.key",
             "attention.value": "crossattention.self.value", "attention.output": "crossattention.output.dense",
             "attention_norm": "crossattention.output.LayerNorm", "feed_forward.up": "intermediate.dense",
             "feed_forward.down": "output.dense", "ffn_norm": "output.LayerNorm"}
    ref = hf_layer.state_dict()
    with torch.no_grad():
        for ours, tensor in decoder.state_dict().items():
            module, leaf = ours.rsplit(".", 1)
            ref[f"{pairs[module]}.{leaf}"].copy_(tensor)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("variant", ["bge", "retromae"])
def test_losses_match_original_computation(hf_checkpoint, tokenizer, variant, attn_impl):
    import transformers

    folder, hf_model = hf_checkpoint
    torch.manual_seed(1)
    model = RetroMAEForPretraining.from_pretrained(folder, variant=variant, attn_impl=attn_impl).eval()
    with torch.no_grad():  # a fresh decoder (std 0.02) barely reacts to its inputs; make it react
        for param in model.decoder.parameters():
            param.add_(0.2 * torch.randn_like(param))
    layer_config = transformers.BertConfig(**{**hf_model.config.to_dict(), "is_decoder": True, "add_cross_attention": True})
    layer_config._attn_implementation = "eager"
    hf_layer = transformers.models.bert.modeling_bert.BertLayer(layer_config).eval()
    copy_decoder_into_hf_layer(model.decoder, hf_layer)

    texts = ["the cells divide rapidly in unbelievably hyperactive tissues", "a protein", "x",
             "immunohistochemistry of mitochondria , tokenization"]
    batch = RetroMAECollator(tokenizer, max_length=32, generator=torch.Generator().manual_seed(3))(texts)
    with torch.no_grad():
        ours = model(**batch)
        ref_encoder, ref_decoder = reference_losses(hf_model, hf_layer, batch, variant)
    assert abs(ours["encoder_loss"] - ref_encoder) <= 1e-5, f"encoder {ours['encoder_loss']:.7f} vs {ref_encoder:.7f}"
    assert abs(ours["decoder_loss"] - ref_decoder) <= 1e-5, f"decoder {ours['decoder_loss']:.7f} vs {ref_decoder:.7f}"
    assert torch.allclose(ours["loss"], ours["encoder_loss"] + ours["decoder_loss"])


def test_variants_differ_only_in_the_query_stream(hf_checkpoint):
    """BGE's h1 is the LayerNorm'd embedding of (h_X + P + T_0); RetroMAE's is the raw h_X + P."""
    folder, _ = hf_checkpoint
    model = RetroMAEForPretraining.from_pretrained(folder).eval()
    h_x = torch.randn(2, 1, model.encoder.config.hidden_size)
    emb = model.encoder.embeddings
    bge = model.query_stream(h_x, 5)
    model.variant = "retromae"
    raw = model.query_stream(h_x, 5)
    expected_raw = h_x + emb.position_embeddings.weight[:5]
    expected_bge = emb.norm(expected_raw + emb.token_type_embeddings.weight[0])
    assert torch.allclose(raw, expected_raw) and torch.allclose(bge, expected_bge, atol=1e-6), diff_report(bge, expected_bge)
    with pytest.raises(ValueError, match="variant"):
        RetroMAEForPretraining(model.encoder, variant="dupmae")


# -----------------------------------------------------------------------------
# Gradients: the decoder reaches the encoder only through the sentence embedding

@pytest.fixture
def tiny_model_and_batch(tokenizer):
    torch.manual_seed(0)
    model = RetroMAEForPretraining(BertModel(tiny_config(tokenizer)))
    model.train()
    texts = ["the cells divide rapidly in unbelievably hyperactive tissues", "a protein of mitochondria"]
    batch = RetroMAECollator(tokenizer, generator=torch.Generator().manual_seed(0))(texts)
    return model, batch


def decoder_args(batch):
    return batch["decoder_input_ids"], batch["decoder_attention_mask"], batch["decoder_labels"]


def test_decoder_gradient_reaches_encoder_only_through_sentence_embedding(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    model.eval()  # no dropout: the two backward passes below must see the same forward
    layer_params = list(model.encoder.layers.parameters())
    hidden = model.encoder(batch["encoder_input_ids"], batch["encoder_attention_mask"])
    h_x = hidden[:, :1]
    loss = model.decoder_loss(h_x, *decoder_args(batch))
    direct = torch.autograd.grad(loss, layer_params, retain_graph=True)
    grad_h_x, = torch.autograd.grad(loss, h_x, retain_graph=True)
    via_h_x = torch.autograd.grad(h_x, layer_params, grad_outputs=grad_h_x)  # chain rule through h_X only
    total = sum(g.abs().sum() for g in direct)
    assert total > 0, "the decoder loss does not reach the encoder layers at all"
    for g, expected in zip(direct, via_h_x):
        assert torch.allclose(g, expected, atol=1e-7, rtol=1e-5), diff_report(g, expected)


def test_detached_sentence_embedding_cuts_the_encoder_off(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    hidden = model.encoder(batch["encoder_input_ids"], batch["encoder_attention_mask"])
    model.decoder_loss(hidden[:, :1].detach(), *decoder_args(batch)).backward()
    assert all(p.grad is None for p in model.encoder.layers.parameters()), "encoder layers got a decoder gradient"
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # shared with the decoder
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_decoder_row_never_depends_on_its_hidden_tokens(tiny_model_and_batch):
    """Change the token at position j: decoder rows that may not attend to j must not move."""
    model, batch = tiny_model_and_batch
    model.eval()
    outputs = []
    model.decoder.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    ids, visible, labels = decoder_args(batch)
    j = 3
    changed = ids.clone()
    changed[:, j] = (changed[:, j] + 17) % model.encoder.config.vocab_size
    h_x = torch.randn(ids.shape[0], 1, model.encoder.config.hidden_size)
    with torch.no_grad():
        model.decoder_loss(h_x, ids, visible, labels)
        model.decoder_loss(h_x, changed, visible, labels)
    moved = (outputs[0] - outputs[1]).abs().amax(-1)  # (B, L)
    blind = ~visible[:, :, j]
    blind[batch["encoder_attention_mask"] == 0] = False  # padded query rows are not scored
    assert moved[blind].max() == 0, f"rows blind to position {j} moved by {moved[blind].max():.2e}"
    assert moved[~blind & batch["encoder_attention_mask"].bool()].max() > 0


# -----------------------------------------------------------------------------
# Edge inputs

def test_short_texts_give_no_nan(tokenizer):
    torch.manual_seed(0)
    model = RetroMAEForPretraining(BertModel(tiny_config(tokenizer))).train()
    collator = RetroMAECollator(tokenizer, generator=torch.Generator().manual_seed(0))
    for texts in (["", "a"], ["", ""], ["a", "bb"], [""]):
        out = model(**collator(texts))
        out["loss"].backward()
        assert all(torch.isfinite(v) for v in out.values()), f"{texts}: {out}"
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), f"{texts}: a gradient is not finite"
        model.zero_grad()
    out = model(**collator(["", ""]))  # nothing to predict at all: 0, not NaN
    assert out["encoder_loss"] == 0 and out["decoder_loss"] == 0


@pytest.mark.slow  # a hundred optimizer steps
def test_losses_fall_when_overfitting_one_batch(tokenizer):
    torch.manual_seed(0)
    model = RetroMAEForPretraining(BertModel(tiny_config(tokenizer, hidden_dropout_prob=0.0,
                                                           attention_probs_dropout_prob=0.0))).train()
    batch = RetroMAECollator(tokenizer, generator=torch.Generator().manual_seed(0))(
        ["the cells divide rapidly in unbelievably hyperactive tissues", "a protein of mitochondria"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        out = model(**batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((out["encoder_loss"].item(), out["decoder_loss"].item()))
    (enc0, dec0), (enc1, dec1) = history[0], history[-1]
    assert enc1 < 0.5 * enc0 and dec1 < 0.5 * dec0, f"losses from {history[0]} to {history[-1]}"


# -----------------------------------------------------------------------------
# Loading and saving

def test_fresh_head_and_decoder_for_a_plain_bert_model(tiny_checkpoint):
    folder, _ = tiny_checkpoint  # a BertModel checkpoint: no cls.*, no decoder file
    model = RetroMAEForPretraining.from_pretrained(folder)
    assert torch.equal(model.head.bias, torch.zeros_like(model.head.bias))
    assert torch.equal(model.head.norm.weight, torch.ones_like(model.head.norm.weight))
    std = model.decoder.attention.query.weight.std().item()
    assert 0.015 < std < 0.025, f"decoder init std {std}, expected HF's 0.02"


def test_save_reloads_in_transformers_and_minibge(hf_checkpoint, tokenizer, tmp_path):
    import transformers

    import minibge

    folder, _ = hf_checkpoint
    model = RetroMAEForPretraining.from_pretrained(folder).eval()
    with torch.no_grad():
        for param in model.decoder.parameters():
            param.add_(0.01)  # so a reload that re-initialised the decoder would show
    out = model.save_pretrained(tmp_path / "saved", tokenizer, max_length=64)
    ids = torch.randint(1000, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.encoder(ids)
        logits = model.head(hidden)
        hf_base, info_base = transformers.BertModel.from_pretrained(out, output_loading_info=True)
        hf_mlm, info_mlm = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
        hf_hidden = hf_base.eval()(input_ids=ids).last_hidden_state
        hf_logits = hf_mlm.eval()(input_ids=ids).logits
    assert not info_mlm["missing_keys"], f"BertForMaskedLM: missing {info_mlm['missing_keys']}"
    assert not info_base["missing_keys"] - {"pooler.dense.weight", "pooler.dense.bias"}
    assert (hidden - hf_hidden).abs().max() <= 1e-5, diff_report(hidden, hf_hidden)
    assert (logits - hf_logits).abs().max() <= 1e-4, diff_report(logits, hf_logits)

    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]  # it has the head
    embedder = minibge.load_embedder(out, device="cpu")
    assert embedder.pooling == "cls" and embedder.max_length == 64
    again = RetroMAEForPretraining.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), f"{name} changed in the round trip"


@pytest.mark.slow
def test_real_minilm_forward(minilm_dir, tokenizer):
    model = RetroMAEForPretraining.from_pretrained(minilm_dir).train()
    batch = RetroMAECollator(tokenizer, max_length=64, generator=torch.Generator().manual_seed(0))(
        ["The cells divide rapidly.", "Mitochondria are the powerhouse of the cell.", ""])
    out = model(**batch)
    out["loss"].backward()
    # a fresh head on a fresh decoder: both losses start near log(V) ≈ 10.3, the encoder's a little lower
    assert all(torch.isfinite(v) and 5 < v < 15 for k, v in out.items() if k != "loss"), out
