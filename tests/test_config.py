"""BertConfig: every field a config.json sets is checked, and a bad one is one clear error
that names the field, the value and the file (never a traceback from deep inside torch)."""
import dataclasses
import json

import pytest

import minibge
from minibge.cli import main
from minibge.config import PRESETS, RULES, BertConfig

from conftest import TINY

# (field, bad value, error type, words the message must contain besides the field and the file)
BAD = [
    ("num_attention_heads", 0, ValueError, "at least 1"),           # was a ZeroDivisionError
    ("vocab_size", -5, ValueError, "at least 1"),                    # was a RuntimeError from nn.Embedding
    ("hidden_size", "384", TypeError, "must be an int"),             # was a string-formatting error
    ("num_hidden_layers", 6.0, TypeError, "must be an int"),         # was "'float' object cannot be interpreted"
    ("num_hidden_layers", True, TypeError, "must be an int"),        # bool is not an int here
    ("intermediate_size", None, TypeError, "must be an int"),
    ("max_position_embeddings", 0, ValueError, "at least 1"),
    ("type_vocab_size", [2], TypeError, "must be an int"),
    ("pad_token_id", -1, ValueError, "at least 0"),
    ("pad_token_id", 512, ValueError, "not below vocab_size"),
    ("layer_norm_eps", 0, ValueError, "between 0 and 1"),
    ("layer_norm_eps", "1e-12", TypeError, "must be a float"),
    ("hidden_dropout_prob", 1.5, ValueError, "in [0, 1)"),
    ("attention_probs_dropout_prob", -0.1, ValueError, "in [0, 1)"),
    ("initializer_range", -0.02, ValueError, "at least 0"),
    ("hidden_act", "swish", ValueError, "one of"),
    ("hidden_act", 1, TypeError, "must be a str"),
    ("position_embedding_type", "relative_key", ValueError, "absolute"),
    ("hidden_size", 30, ValueError, "not divisible by num_attention_heads 4"),
]


def write_config(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({**BertConfig(**TINY).to_dict(), **changes}))
    return path


@pytest.mark.parametrize("field, value, error, words", BAD, ids=[f"{f}={v!r}" for f, v, _, _ in BAD])
def test_bad_field_names_field_value_and_file(tmp_path, field, value, error, words):
    path = write_config(tmp_path, **{field: value})
    with pytest.raises(error) as info:
        BertConfig.from_json(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and field in message and words in message, message
    assert repr(value) in message or str(value) in message, message


@pytest.mark.parametrize("field, value, error, words", BAD[:4], ids=[f"{f}={v!r}" for f, v, _, _ in BAD[:4]])
def test_bad_config_is_one_line_from_the_cli_and_one_error_from_load_model(tmp_path, capsys, field, value, error, words):
    folder = tmp_path / "bad-model"
    path = write_config(folder, **{field: value})
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(error, match=field):
        minibge.load_model(folder)
    assert main(["info", "-m", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"minibge: error: {path}: {field}") and "Traceback" not in "".join(err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_every_field_has_a_rule():
    covered = [name for names in RULES for name in names]
    assert sorted(covered) == sorted(f.name for f in dataclasses.fields(BertConfig))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_and_the_defaults_are_valid(name):
    config = dataclasses.replace(PRESETS[name])  # replace() runs the checks again
    assert config.hidden_size % config.num_attention_heads == 0
    BertConfig()


def test_integers_for_float_fields_are_fine(tmp_path):
    config = BertConfig.from_json(write_config(tmp_path, hidden_dropout_prob=0, layer_norm_eps=1e-12))
    assert config.hidden_dropout_prob == 0


def test_missing_key_and_non_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=f"{path} is missing required key"):
        BertConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="should hold a JSON object"):
        BertConfig.from_json(path)
