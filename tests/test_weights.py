"""Loading official-layout checkpoints (and their re-exported variants), bad files, saving back."""
import json

import pytest
import torch
from conftest import TINY, diff_report, official_state_dict, random_batch, write_checkpoint
from safetensors import safe_open

import minibge
from minibge import BertConfig
from minibge.weights import KEY_MAP, official_names


def outputs_equal_hf(model, hf_model, atol=1e-5):
    ids, mask, types = random_batch(model.config, 3, 12, seed=5)
    with torch.no_grad():
        ours = model(ids, mask, types)
        ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=atol), diff_report(ours[real], ref[real])


def test_official_layout_file_is_what_we_think(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("embeddings.position_ids").dtype == torch.int64
    assert len(keys) == 5 + 1 + 16 * TINY["num_hidden_layers"] + 2


def test_key_map_covers_every_parameter_once():
    model = minibge.BertModel(BertConfig(**TINY))
    names = official_names(model)
    assert len(set(names.values())) == len(names) == len(model.state_dict())
    assert len(KEY_MAP) == 13


@pytest.mark.parametrize("variant", ["official", "bert_prefix", "gamma_beta", "no_pooler", "no_position_ids",
                                     "mlm_head", "fp16", "bin", "sharded"])
def test_loads_official_and_variant_layouts(tmp_path, tiny_checkpoint, variant):
    _, hf_model = tiny_checkpoint
    config = BertConfig(**TINY)
    state = official_state_dict(hf_model)
    fmt = {"bin": "bin", "sharded": "sharded"}.get(variant, "safetensors")
    if variant == "bert_prefix":
        state = {f"bert.{k}": v for k, v in state.items()}
    if variant == "gamma_beta":
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state.items()}
    if variant == "no_pooler":
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    if variant == "no_position_ids":
        del state["embeddings.position_ids"]
    if variant == "mlm_head":  # a BertForMaskedLM export, e.g. after RetroMAE pre-training
        state = {f"bert.{k}": v for k, v in state.items()}
        state["cls.predictions.bias"] = torch.zeros(config.vocab_size)
    if variant == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    model = minibge.load_model(write_checkpoint(tmp_path / variant, config, state, fmt))
    assert not model.training
    assert (model.pooler is None) == (variant == "no_pooler")
    outputs_equal_hf(model, hf_model, atol=5e-3 if variant == "fp16" else 1e-5)


def test_save_pretrained_round_trips_through_transformers(tmp_path, tiny_checkpoint):
    from transformers import AutoModel
    folder, hf_model = tiny_checkpoint
    model = minibge.load_model(folder)
    out = minibge.save_pretrained(model, tmp_path / "saved")
    with safe_open(out / "model.safetensors", "pt") as f, safe_open(folder / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys()), "saved file must use the official key set"
        assert f.metadata() == {"format": "pt"}
        for key in g.keys():
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
    reloaded, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    outputs_equal_hf(model, reloaded.eval(), atol=0)
    again = minibge.load_model(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# -----------------------------------------------------------------------------
# Bad files → one clear exception, naming what is wrong

def test_missing_folder_config_or_weights(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        minibge.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minibge.load_model(tmp_path / "empty")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        minibge.load_model(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_truncated_or_corrupted_safetensors(tiny_checkpoint, damage):
    folder, _ = tiny_checkpoint
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 64 + data[64:],
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        minibge.load_model(folder)


def test_corrupted_pytorch_bin(tmp_path, tiny_checkpoint):
    _, hf_model = tiny_checkpoint
    folder = write_checkpoint(tmp_path / "bin", BertConfig(**TINY), official_state_dict(hf_model), "bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="could not read"):
        minibge.load_model(folder)


def test_wrong_shape_names_the_tensor(tmp_path, tiny_checkpoint):
    _, hf_model = tiny_checkpoint
    state = official_state_dict(hf_model)
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(65, TINY["hidden_size"])
    folder = write_checkpoint(tmp_path / "bad", BertConfig(**TINY), state)
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight has shape \(65, 32\).*\(64, 32\)"):
        minibge.load_model(folder)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, tiny_checkpoint):
    _, hf_model = tiny_checkpoint
    state = official_state_dict(hf_model)
    del state["encoder.layer.0.attention.self.key.bias"]
    state["encoder.layer.2.attention.self.key.bias"] = torch.zeros(TINY["hidden_size"])
    folder = write_checkpoint(tmp_path / "bad", BertConfig(**TINY), state)
    with pytest.raises(ValueError, match=r"missing \(1\).*layer\.0\.attention\.self\.key\.bias[\s\S]*unexpected \(1\).*layer\.2"):
        minibge.load_model(folder)


def test_layer_count_mismatch(tmp_path, tiny_checkpoint):
    _, hf_model = tiny_checkpoint
    config = BertConfig(**{**TINY, "num_hidden_layers": 3})
    folder = write_checkpoint(tmp_path / "bad", config, official_state_dict(hf_model))
    with pytest.raises(ValueError, match="missing"):
        minibge.load_model(folder)


def test_bad_config_json(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        minibge.load_model(folder)
    cfg = BertConfig(**TINY).to_dict()
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['hidden_size'\]"):
        minibge.load_model(folder)


def test_config_ignores_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BertConfig(**TINY).to_dict(), "pooler_fc_size": 768, "directionality": "bidi"}))
    assert BertConfig.from_json(path) == BertConfig(**TINY)


def test_sharded_index_naming_a_missing_shard(tmp_path, tiny_checkpoint):
    _, hf_model = tiny_checkpoint
    folder = write_checkpoint(tmp_path / "sharded", BertConfig(**TINY), official_state_dict(hf_model), "sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard model-00002"):
        minibge.load_model(folder)


def test_saved_weights_follow_the_umask(tmp_path):
    # safetensors alone writes 0600 files; a saved model should be as readable as its config.json
    import os
    folder = minibge.save_pretrained(minibge.BertModel(BertConfig(**TINY)), tmp_path / "saved")
    modes = {name: os.stat(folder / name).st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes["model.safetensors"] == modes["config.json"], modes
