"""minibge.tokenizer must give exactly the ids transformers gives, on any text.

transformers is the reference here (tests only; the package itself does not depend on it).
Everything runs offline against the local all-MiniLM-L6-v2 folder (fixture `minilm_dir`).
"""
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_module

from minibge.tokenizer import Tokenizer

transformers = require_module("transformers")

MAX_LENGTHS = [2, 8, 256, 512]

# Characters that stress each normalization step: ASCII and punctuation, accented Latin (both
# precomposed and combining marks), Greek/Cyrillic, CJK ideographs, Japanese kana, Hangul,
# emoji, control and format characters, and many kinds of whitespace.
_ALPHABET = st.one_of(
    st.sampled_from("abcXYZ019 .,!?'\"-[]#@"),
    st.sampled_from("éÉàçñüÅøßœ\u0301\u0308\u0327ĳﬁ"),
    st.sampled_from("αβΩжЯ"),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK unified ideographs
    st.sampled_from("ひらカナ한국어"),
    st.sampled_from("😀🤖👍🏽\u200d❤️"),
    st.sampled_from("\x00\x01\x07\x1b\x7f\ufffd\u200b\ufeff"),
    st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u3000\u2028"),
    st.characters(exclude_categories=["Cs"]),  # anything else (lone surrogates: tested below)
)
TEXTS = st.one_of(
    st.text(_ALPHABET, max_size=60),
    st.text(st.sampled_from(" \t\n\u3000"), max_size=5),  # empty or whitespace only
    st.text(_ALPHABET, min_size=600, max_size=2000),  # long enough to be truncated at 512
    st.lists(st.sampled_from(["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[mask]", "hello", " ", "é"]),
             max_size=8).map("".join),  # literal special tokens inside the text
)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fallback_folder(src, dst, **config_overrides):
    """Copy vocab.txt and the configs (not tokenizer.json) to dst, optionally editing the config."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    if config_overrides:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config.update(config_overrides)
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def pairs(minilm_dir, tmp_path_factory):
    """(name, ours, reference) for the tokenizer.json path and for several vocab.txt fallbacks."""
    root = tmp_path_factory.mktemp("tok")
    folders = {
        "tokenizer.json": minilm_dir,
        "vocab.txt uncased": _fallback_folder(minilm_dir, root / "uncased"),
        # Chinese-BERT style: cased, and accents kept because strip_accents follows lowercase.
        "vocab.txt cased": _fallback_folder(minilm_dir, root / "cased", do_lower_case=False),
        "vocab.txt lower, accents kept, no CJK split": _fallback_folder(
            minilm_dir, root / "odd", strip_accents=False, tokenize_chinese_chars=False),
    }
    return [(name, Tokenizer.from_pretrained(f), transformers.AutoTokenizer.from_pretrained(f))
            for name, f in folders.items()]


def _assert_same(pairs, texts, max_length):
    for name, ours, ref in pairs:
        got = ours.encode_batch(texts, max_length)
        want = ref(texts, truncation=True, max_length=max_length)["input_ids"]
        for text, g, w in zip(texts, got, want):
            assert g == w, f"[{name}, max_length={max_length}] text={text!r}\n ours={g}\n  ref={w}"


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
@SETTINGS
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_ids_match_transformers(pairs, texts, max_length):
    _assert_same(pairs, texts, max_length)


def test_fixed_examples_match_transformers(pairs):
    texts = ["Héllo, Wörld! Don't panic.", "", "   \t\n", "日本語のテキスト and 中文", "😀🤖 emoji",
             "x" * 101, "word " * 1000, "a[MASK]b [SEP] [mask]", "\x00\x07control\u200bchars",
             "naïve café résumé", "ＦＵＬＬＷＩＤＴＨ ｆｏｏ"]
    for max_length in MAX_LENGTHS:
        _assert_same(pairs, texts, max_length)


def test_library_truncation_from_tokenizer_json_is_ignored(minilm_dir):
    # all-MiniLM-L6-v2's tokenizer.json truncates and pads to 128 on its own; we must not.
    tok = Tokenizer.from_pretrained(minilm_dir)
    ids = tok.encode_batch(["hello world", "word " * 400], max_length=512)
    assert ids[0] == [tok.cls_token_id, 7592, 2088, tok.sep_token_id]
    assert len(ids[1]) == 402
    assert len(tok.encode_batch(["word " * 400], max_length=300)[0]) == 300
    assert ids[1][-1] == tok.sep_token_id


def test_attributes(minilm_dir):
    tok = Tokenizer.from_pretrained(minilm_dir)
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
    assert tok.model_max_length == 512
    assert tok.vocab_size == 30522


def test_pad_shape_and_mask(minilm_dir):
    tok = Tokenizer.from_pretrained(minilm_dir)
    ids = tok.encode_batch(["a", "a longer sentence here", ""], max_length=16)
    input_ids, mask = tok.pad(ids)
    assert input_ids.dtype == mask.dtype == torch.long
    assert input_ids.shape == mask.shape == (3, max(len(x) for x in ids))
    for row, x in enumerate(ids):
        assert input_ids[row, : len(x)].tolist() == x
        assert (input_ids[row, len(x):] == tok.pad_token_id).all()
        assert mask[row].tolist() == [1] * len(x) + [0] * (input_ids.shape[1] - len(x))
    empty_ids, empty_mask = tok.pad([])
    assert empty_ids.shape == empty_mask.shape == (0, 0)


def test_call_matches_transformers_padding(minilm_dir):
    tok = Tokenizer.from_pretrained(minilm_dir)
    ref = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["short", "a somewhat longer sentence, with punctuation!", ""]
    out = tok(texts, max_length=8)
    want = ref(texts, truncation=True, max_length=8, padding=True, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    for key in out:
        assert torch.equal(out[key], want[key]), key
    single = tok("just one")
    assert single["input_ids"].shape[0] == 1


@pytest.mark.parametrize("bad, index, type_name", [
    (["ok", None], 1, "NoneType"), (["a", "b", "c", b"bytes"], 3, "bytes"), ([3.5], 0, "float")])
def test_type_error_names_index_and_type(minilm_dir, bad, index, type_name):
    tok = Tokenizer.from_pretrained(minilm_dir)
    with pytest.raises(TypeError, match=rf"texts\[{index}\] is {type_name}, expected str"):
        tok.encode_batch(bad, max_length=8)


def test_lone_surrogate_is_a_clear_value_error(minilm_dir):
    tok = Tokenizer.from_pretrained(minilm_dir)
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode: lone surrogate '\\ud800' at position 1"):
        tok.encode_batch(["fine", "x\ud800y"], max_length=8)


def test_bad_arguments(minilm_dir):
    tok = Tokenizer.from_pretrained(minilm_dir)
    with pytest.raises(TypeError, match="list of str"):
        tok.encode_batch("not a list", max_length=8)
    with pytest.raises(ValueError, match="at least 2"):
        tok.encode_batch(["x"], max_length=1)
    assert tok.encode_batch([], max_length=8) == []


def test_missing_files_error_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "vocab.txt" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
