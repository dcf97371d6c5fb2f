"""Official BGE checkpoints ⇄ minibge's BertModel.

A BGE folder holds `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`,
or an old `pytorch_model.bin`). The tensors carry Hugging Face's TF-era names; ours are shorter.
The whole translation is one table, KEY_MAP, read left to right:

    official (HF BertModel) name                    minibge name
    encoder.layer.{i}.attention.self.query      →   layers.{i}.attention.query      (.weight / .bias)

XLM-RoBERTa checkpoints (BGE-M3, the BGE rerankers) use the very same module names (transformers'
XLMRobertaModel copies BertModel's), so the one table serves both; only the prefix a task model
puts in front differs, PREFIXES below: `bert.` in a BertFor..., `roberta.` in an XLMRobertaFor...

Loading is a checklist, nanoGPT style: read every tensor, normalise the known variants (a `bert.`
or `roberta.` prefix, legacy LayerNorm gamma/beta, the int64 `embeddings.position_ids` buffer the official files
carry, MLM/NSP heads), then demand the exact key set and every shape *before* touching the
model, so a bad file raises a ValueError that names the tensor and leaves nothing half-built.
No Linear is transposed: HF BERT stores nn.Linear weights as (out, in), exactly as we do.

A folder is untrusted. Before any weight is read, load_model refuses a folder whose training run
did not finish (run.json "finished": false: its last save may have been cut short), and
check_side_files checks the sentence-transformers files (modules.json, 1_Pooling/config.json,
sentence_bert_config.json, config_sentence_transformers.json) and the tokenizer's JSON files field
by field, with errors naming the file and the field, and keeps every path modules.json names
inside the folder. save_pretrained builds its files in a temporary folder renamed into place.
"""
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import hub
from .common import atomic_folder, read_json, read_json_object
from .config import BertConfig
from .model import BertModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
RUN_FILE = "run.json"  # written by minibge's training loop (train/loop.py): "finished" false until the final save is in

# official module path → minibge module path; each row covers its .weight and .bias
KEY_MAP = {
    "embeddings.word_embeddings":                    "embeddings.word_embeddings",
    "embeddings.position_embeddings":                "embeddings.position_embeddings",
    "embeddings.token_type_embeddings":              "embeddings.token_type_embeddings",
    "embeddings.LayerNorm":                          "embeddings.norm",
    "encoder.layer.{i}.attention.self.query":        "layers.{i}.attention.query",
    "encoder.layer.{i}.attention.self.key":          "layers.{i}.attention.key",
    "encoder.layer.{i}.attention.self.value":        "layers.{i}.attention.value",
    "encoder.layer.{i}.attention.output.dense":      "layers.{i}.attention.output",
    "encoder.layer.{i}.attention.output.LayerNorm":  "layers.{i}.attention_norm",
    "encoder.layer.{i}.intermediate.dense":          "layers.{i}.feed_forward.up",
    "encoder.layer.{i}.output.dense":                "layers.{i}.feed_forward.down",
    "encoder.layer.{i}.output.LayerNorm":            "layers.{i}.ffn_norm",
    "pooler.dense":                                  "pooler.dense",
}
# model_type -> the prefix of the encoder's names inside a task model (BertForSequenceClassification's
# "bert.encoder.layer.0...", XLMRobertaForSequenceClassification's "roberta.encoder.layer.0..."); a bare
# encoder (BertModel, XLMRobertaModel, every BGE embedder) has none
PREFIXES = {"bert": "bert.", "xlm-roberta": "roberta."}
POSITION_IDS = "embeddings.position_ids"  # an int64 arange(512) buffer in the official files, not a weight


def official_names(model: BertModel) -> dict:
    """{minibge state_dict name: official name} for exactly the parameters `model` has."""
    module_map = {}
    for official, ours in KEY_MAP.items():
        for i in range(model.config.num_hidden_layers) if "{i}" in official else [None]:
            module_map[ours.format(i=i)] = official.format(i=i)
    names = {}
    for name in model.state_dict():
        module, leaf = name.rsplit(".", 1)  # "layers.0.attention.query", "weight"
        assert module in module_map, f"no KEY_MAP row for minibge module {module}"
        names[name] = f"{module_map[module]}.{leaf}"
    return names


# -----------------------------------------------------------------------------
# Reading tensors from a folder

def read_state_dict(directory: Path) -> dict:
    """All tensors of a checkpoint folder, by official name, on the CPU."""
    safetensors_file = directory / SAFETENSORS_NAME
    index_file = directory / SAFETENSORS_INDEX_NAME
    pytorch_file = directory / PYTORCH_NAME
    if safetensors_file.exists():
        return _read_safetensors(safetensors_file)
    if index_file.exists():
        return _read_sharded(index_file)
    if pytorch_file.exists():
        try:
            # weights_only=True: a .bin is a pickle, and we never run code from a downloaded file
            state = torch.load(pytorch_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged pickle/zip
            raise ValueError(f"could not read {pytorch_file}: {err}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{pytorch_file} holds a {type(state).__name__}, expected a state dict")
        return state
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS_NAME}, "
                            f"{SAFETENSORS_INDEX_NAME} (+ shards) or {PYTORCH_NAME}")


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"could not read {path} (truncated or corrupted?): {err}") from None


def _read_sharded(index_file: Path) -> dict:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_file} is not a valid safetensors index: {err}") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_file.parent / shard
        if not shard_path.exists():
            raise FileNotFoundError(f"{index_file} names shard {shard}, which is missing")
        state.update(_read_safetensors(shard_path))
    if set(state) != set(weight_map):
        raise ValueError(f"shards of {index_file} do not hold the tensors its weight_map lists "
                         f"(missing: {sorted(set(weight_map) - set(state))[:5]})")
    return state


def normalize_names(state: dict) -> dict:
    """Bring the known re-exported variants to the official BertModel names."""
    for prefix in PREFIXES.values():
        if any(name.startswith(prefix) for name in state):
            state = {name.removeprefix(prefix): tensor for name, tensor in state.items()}
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("cls."):  # BertForPreTraining / MaskedLM heads (e.g. a RetroMAE checkpoint)
            logger.info("ignoring pre-training head tensor %s", name)
            continue
        # old TF-converted checkpoints call LayerNorm's parameters gamma/beta
        if ".LayerNorm.gamma" in name or ".LayerNorm.beta" in name:
            name = name.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        renamed[name] = tensor
    position_ids = renamed.pop(POSITION_IDS, None)
    if position_ids is not None and not torch.equal(position_ids.flatten(), torch.arange(position_ids.numel())):
        raise ValueError(f"{POSITION_IDS} in the checkpoint is not 0..N-1; minibge only supports absolute positions")
    return renamed


# -----------------------------------------------------------------------------
# Checking and copying

def copy_checked(module: nn.Module, tensors: dict, source: str, names: dict | None = None,
                 what: str | None = None) -> None:
    """Copy `tensors` into `module` after checking the exact key set, every shape and every dtype.

    names: {module's state_dict name: name in `tensors`} for the tensors to fill (default: all of the
    module's, under their own names). Everything is checked before anything is copied, so a bad file
    raises a ValueError naming the tensor and leaves the module as it was. `what` names the module
    in the key-set message (e.g. "a BertModel with 12 layers").
    """
    ours = module.state_dict()
    names = names if names is not None else {name: name for name in ours}
    expected, found = set(names.values()), set(tensors)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match {what or type(module).__name__}:\n"
                         f"  missing ({len(missing)}): {missing[:10]}\n  unexpected ({len(unexpected)}): {unexpected[:10]}")
    for our_name, theirs in names.items():
        if tuple(tensors[theirs].shape) != tuple(ours[our_name].shape):
            raise ValueError(f"{source}: tensor {theirs} has shape {tuple(tensors[theirs].shape)}, "
                             f"but config.json implies {tuple(ours[our_name].shape)}")
        if not tensors[theirs].is_floating_point():
            raise ValueError(f"{source}: tensor {theirs} has dtype {tensors[theirs].dtype}, expected a float type")
    with torch.no_grad():
        for our_name, theirs in names.items():
            ours[our_name].copy_(tensors[theirs])  # copy_ also converts fp16/bf16 files to the module's dtype


def load_state_into(model: BertModel, state: dict, source: str = "checkpoint") -> None:
    """Copy official-named tensors into `model` after checking the exact key set and every shape."""
    copy_checked(model, normalize_names(state), source, official_names(model),
                 what=f"a BertModel with {model.config.num_hidden_layers} layers")


# -----------------------------------------------------------------------------
# Checking a folder before loading it

def check_training_finished(directory: Path) -> None:
    """Refuse a folder a minibge training run is still writing, or whose final save was cut short:
    its run.json says "finished": false, and its files may be a mix (new tokenizer, old pooling)."""
    run = read_json(directory / RUN_FILE)
    if isinstance(run, dict) and "finished" in run and run["finished"] is not True:
        raise ValueError(f"{directory} holds a training run that has not finished ({RUN_FILE}: \"finished\": "
                         f"{json.dumps(run['finished'])}); its files may be incomplete. Finish it with the same "
                         f"training command and --resume, or load one of its checkpoint-N folders")


def _field(path: Path, obj: dict, name: str, kinds: tuple, what: str) -> None:
    value = obj.get(name)
    if name in obj and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise ValueError(f"{path}: field {name!r} must be {what}, got {json.dumps(value)[:60]}")


def module_path(directory: Path, entry_path: str, source: Path) -> Path:
    """A path modules.json names, checked to stay inside the folder (no absolute path, no "..")."""
    folder = directory.resolve()
    target = (directory / entry_path).resolve()
    if Path(entry_path).is_absolute() or not (target == folder or folder in target.parents):
        raise ValueError(f"{source}: module path {entry_path!r} leads outside {directory}")
    return directory / entry_path


def check_side_files(directory: Path) -> None:
    """Check the sentence-transformers files load_embedder reads, field by field (ValueError naming
    the file and the field). (The tokenizer checks its own files: tokenizer.py.)"""
    directory = Path(directory)
    modules_file = directory / "modules.json"
    modules = read_json(modules_file)
    pooling_dir = directory / "1_Pooling"
    if modules is not None:
        if not isinstance(modules, list):
            raise ValueError(f"{modules_file} must hold a JSON list of modules, got {type(modules).__name__}")
        for i, module in enumerate(modules):
            if not isinstance(module, dict):
                raise ValueError(f"{modules_file}: entry {i} must be an object, got {json.dumps(module)[:60]}")
            for name in ("type", "path", "name"):
                _field(modules_file, module, name, (str,), "a string")
            folder = module_path(directory, module.get("path") or "", modules_file)
            if module.get("type", "").endswith("Pooling") and module.get("path"):
                pooling_dir = folder
    pooling_file = pooling_dir / "config.json"
    pooling = read_json_object(pooling_file)
    if pooling is not None:
        _field(pooling_file, pooling, "pooling_mode", (str,), "a string")
        _field(pooling_file, pooling, "word_embedding_dimension", (int,), "an integer")
        for name in pooling:
            if name.startswith("pooling_mode_") or name == "include_prompt":
                _field(pooling_file, pooling, name, (bool,), "true or false")
    st_file = directory / "sentence_bert_config.json"
    st = read_json_object(st_file)
    if st is not None:
        _field(st_file, st, "max_seq_length", (int, type(None)), "an integer ≥ 2 or null")
        if isinstance(st.get("max_seq_length"), int) and st["max_seq_length"] < 2:
            raise ValueError(f"{st_file}: field 'max_seq_length' must be an integer ≥ 2, got {st['max_seq_length']}")
        _field(st_file, st, "do_lower_case", (bool,), "true or false")
    prompts_file = directory / "config_sentence_transformers.json"
    config = read_json_object(prompts_file)
    if config is not None:
        _field(prompts_file, config, "prompts", (dict, type(None)), "an object of strings")
        for name, prompt in (config.get("prompts") or {}).items():
            if not isinstance(prompt, str):
                raise ValueError(f"{prompts_file}: field 'prompts.{name}' must be a string, got {json.dumps(prompt)[:60]}")
        _field(prompts_file, config, "default_prompt_name", (str, type(None)), "a string or null")


def load_model(path, attn_impl: str = "sdpa", device=None, dtype=None) -> BertModel:
    """A checkpoint folder → BertModel in eval mode, every tensor checked on the way in."""
    directory = hub.resolve_model_path(path) if hub.is_hub_id(str(path)) else Path(path)  # as load_embedder
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder not found: {directory}")
    check_training_finished(directory)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is this a BERT/BGE checkpoint folder?")
    config = BertConfig.from_json(directory / CONFIG_NAME)
    state = read_state_dict(directory)
    has_pooler = any(name.startswith(("pooler.", *(p + "pooler." for p in PREFIXES.values()))) for name in state)
    model = BertModel(config, attn_impl=attn_impl, add_pooler=has_pooler)
    load_state_into(model, state, source=str(directory))
    logger.info("loaded %s: %d layers, hidden %d, %.1fM parameters%s", directory, config.num_hidden_layers,
                config.hidden_size, sum(p.numel() for p in model.parameters()) / 1e6, "" if has_pooler else ", no pooler")
    return model.to(device=device, dtype=dtype).eval()


def write_safetensors(tensors: dict, path: Path) -> None:
    """save_file with metadata {"format": "pt"} (what transformers expects), and the file mode every
    other file gets: safetensors creates its files owner-only (0600) whatever the umask says."""
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(model: BertModel, directory, extra_tensors: dict | None = None,
                    architectures: list[str] | None = None, prefix: str = "", extra_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors exactly as the official BAAI files are laid out:
    unprefixed official names, the pooler when the model has one, and the int64 position_ids
    buffer, with safetensors metadata {"format": "pt"} (what transformers expects).

    extra_tensors: more official-named tensors for the same file (RetroMAE's MLM head, cls.*);
    architectures: config.json's "architectures" (default ["BertModel"], or ["XLMRobertaModel"]), what
    tools such as the Hub's widgets read to pick a class for the file; prefix: put before every encoder
    name (PREFIXES: a cross-encoder's "bert." / "roberta.", reranker.py); extra_config: more config.json
    keys (a cross-encoder's id2label).

    The files are written into a temporary folder beside `directory` and moved into place at the
    end (common.atomic_folder): a new folder appears complete or not at all.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(directory) as partial:
        _write_model_files(model, partial, extra_tensors, architectures, prefix, extra_config)
    return directory


def _write_model_files(model: BertModel, directory: Path, extra_tensors: dict | None,
                       architectures: list[str] | None, prefix: str, extra_config: dict | None) -> None:
    ours = model.state_dict()
    tensors = {prefix + official: ours[name].detach().cpu().contiguous() for name, official in official_names(model).items()}
    tensors[prefix + POSITION_IDS] = torch.arange(model.config.max_position_embeddings).unsqueeze(0)  # (1, P) int64
    tensors.update({name: tensor.detach().cpu().contiguous() for name, tensor in (extra_tensors or {}).items()})
    write_safetensors(tensors, directory / SAFETENSORS_NAME)
    config = model.config.to_dict()
    if architectures is not None:
        config["architectures"] = list(architectures)
    config.update(extra_config or {})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
