"""Shared fixtures: where the real data and weights live, and how to react when they are missing.

Locally a missing data set or checkpoint is a skip; under CI (``CI=true``) it is a failure,
because CI is supposed to have them and a silent skip would hide a broken set-up.
"""
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "eval" / "data"
WEIGHTS_DIR = REPO_ROOT / "weights"
MINILM_DIR = WEIGHTS_DIR / "all-MiniLM-L6-v2"
IN_CI = os.environ.get("CI", "").lower() == "true"

# the fast path's per-machine kernel choice (minibge/fast/kernels.py) is cached under the user's cache
# folder; tests keep theirs in a folder of their own, measured once per test session
import tempfile  # noqa: E402
os.environ.setdefault("MINIBGE_CACHE_DIR", tempfile.mkdtemp(prefix="minibge-test-cache-"))


def require_path(path: Path, what: str) -> Path:
    """Return `path` if it exists; otherwise skip the test (or fail it under CI=true)."""
    if path.exists():
        return path
    message = f"{what} not found at {path}"
    if IN_CI:
        pytest.fail(message + " (CI=true: required data must be present)")
    pytest.skip(message)


def require_module(name: str):
    """Import an optional test dependency; skip without it, except under CI=true, where it must be there."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if IN_CI:
            pytest.fail(f"test dependency {name!r} is not installed ({err}); CI=true requires it")
        pytest.skip(f"{name} is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/eval/data: STS-B, SICK, SciFact."""
    return require_path(SHARED_DATA, "shared evaluation data")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint (fetched by `python weights/fetch_minilm.py`)."""
    return require_path(MINILM_DIR / "model.safetensors", "all-MiniLM-L6-v2 checkpoint").parent


# -----------------------------------------------------------------------------
# Synthetic checkpoints in BGE's exact official file layout (flagembedding.md §4.2):
# unprefixed HF BertModel names, the pooler, an int64 `embeddings.position_ids` (1, 512),
# float32 tensors and safetensors metadata {"format": "pt"}. Random weights, with LayerNorm
# parameters pushed away from 1/0 so a mis-wired norm cannot hide.

TINY = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


def hf_reference_model(config, seed=0, attn_implementation="sdpa"):
    """A transformers BertModel with the given minibge config and random, perturbed weights."""
    import torch
    import transformers

    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k not in ("architectures",)})
    hf_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = transformers.BertModel(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def official_state_dict(hf_model):
    """The tensors of hf_model under the names and dtypes of the official BAAI files."""
    import torch

    state = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()
             if not k.endswith(("position_ids", "token_type_ids"))}
    state["embeddings.position_ids"] = torch.arange(hf_model.config.max_position_embeddings).unsqueeze(0)
    return state


def write_checkpoint(directory, config, state, fmt="safetensors"):
    """Write config.json plus `state` as model.safetensors, a 2-shard index, or pytorch_model.bin."""
    import json

    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    if fmt == "safetensors":
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "sharded":
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, directory / shard, metadata={"format": "pt"})
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    return directory


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """(folder, hf_model) for a tiny random BERT in the official layout."""
    from minibge import BertConfig

    config = BertConfig(**TINY)
    hf_model = hf_reference_model(config)
    return write_checkpoint(tmp_path / "tiny", config, official_state_dict(hf_model)), hf_model


def random_batch(config, batch_size, seq_len, seed=0):
    """input_ids, attention_mask (random right-padded lengths, first row full), token_type_ids."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(2, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # [PAD] = 0 at padded positions, as a tokenizer would produce
    token_types = torch.randint(0, config.type_vocab_size, (batch_size, seq_len), generator=gen) * mask
    return ids, mask, token_types


def diff_report(a, b):
    """max / mean absolute difference, for assertion messages."""
    d = (a - b).abs()
    return f"max |diff| {d.max().item():.3e}, mean |diff| {d.mean().item():.3e}"


def compare_with_hf(model, hf_model, input_ids, attention_mask, token_type_ids):
    """Run both models; return (max |diff| over real tokens, mean |diff|, min CLS cosine)."""
    import torch

    with torch.no_grad():
        ours = model(input_ids, attention_mask, token_type_ids)
        ref = hf_model(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).last_hidden_state
    real = attention_mask.bool()  # padded query rows are finite garbage in both: compare real tokens only
    diff = (ours - ref)[real].abs()
    # cosine in float64: in float32 even two identical 384-d vectors can come out at 0.9999996
    cls_cos = torch.nn.functional.cosine_similarity(ours[:, 0].double(), ref[:, 0].double(), dim=-1)
    return diff.max().item(), diff.mean().item(), cls_cos.min().item()


# -----------------------------------------------------------------------------
# Gradients: minibge vs transformers, parameter by parameter

def training_pair(config, seed=1, hf_model=None):
    """(minibge BertModel, transformers BertModel) with the same weights, both in train mode."""
    from minibge import BertModel
    from minibge.weights import load_state_into

    hf_model = hf_model if hf_model is not None else hf_reference_model(config, seed=seed)
    model = BertModel(config)
    load_state_into(model, official_state_dict(hf_model))
    return model.train(), hf_model.train()


def pooled_loss(last_hidden, pooler_out, attention_mask, seed=0):
    """A loss that reaches every parameter: the L2-normalised CLS vector (BGE's embedding), the masked
    mean (all-MiniLM's) and the tanh pooler, each dotted with a fixed random direction."""
    import torch

    from minibge import cls_pool, l2_normalize, mean_pool

    gen = torch.Generator().manual_seed(seed)
    H = last_hidden.shape[-1]
    w_cls, w_mean, w_pool = (torch.randn(H, generator=gen, dtype=last_hidden.dtype).to(last_hidden.device) for _ in range(3))
    return (l2_normalize(cls_pool(last_hidden)) @ w_cls).square().sum() \
        + (mean_pool(last_hidden, attention_mask) @ w_mean).sum() + (pooler_out @ w_pool).sum()


def gradient_errors(model, hf_model, input_ids, attention_mask, token_type_ids):
    """{official parameter name: relative error ‖g_ours − g_hf‖ / ‖g_hf‖} after one backward pass each."""
    from minibge.weights import official_names

    model.zero_grad(set_to_none=True)
    hidden = model(input_ids, attention_mask, token_type_ids)
    pooled_loss(hidden, model.pooler_output(hidden), attention_mask).backward()
    hf_model.zero_grad(set_to_none=True)
    out = hf_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    pooled_loss(out.last_hidden_state, out.pooler_output, attention_mask).backward()

    hf_params = dict(hf_model.named_parameters())
    errors = {}
    for name, param in model.named_parameters():
        official = official_names(model)[name]
        ours, ref = param.grad, hf_params[official].grad
        assert ours is not None and ref is not None, f"{official}: no gradient (ours {ours is not None}, hf {ref is not None})"
        scale = ref.norm()
        if official.endswith("attention.self.key.bias"):
            # The key bias's exact gradient is zero: it adds the same q·b_k to every score in a softmax
            # row, which the softmax ignores. Both sides hold rounding noise (~1e-10), so I measure the
            # difference against the key weight's gradient rather than against noise.
            scale = hf_params[official.replace(".bias", ".weight")].grad.norm()
        errors[official] = ((ours - ref).norm() / scale.clamp(min=1e-30)).item()
    return errors


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture
def fake_bge(tmp_path, minilm_dir):
    """A random-weight checkpoint named like BGE, with the real uncased WordPiece tokenizer, no ST files."""
    def make(name="bge-small-en-v1.5"):
        from minibge import BertConfig
        config = BertConfig(**{**TINY, "vocab_size": 30522, "max_position_embeddings": 512})
        folder = write_checkpoint(tmp_path / name, config, official_state_dict(hf_reference_model(config)))
        for f in TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, folder / f)
        return folder
    return make


def torchrun_minibge(*args, nproc: int = 2, timeout: int = 300):
    """`torchrun --standalone --nproc_per_node 2 -m minibge ARGS` as a CPU job (gloo, one thread per
    rank, this checkout's minibge); fails the test with the ranks' stderr unless it succeeds."""
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "minibge", *args],
                            capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged_steps(out: Path) -> list[int]:
    """The step of every line of a training run's train_log.jsonl."""
    import json

    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def crash_then_resume(monkeypatch, module, loss_name: str, run, out: Path, crash_after: int = 5) -> None:
    """A run dies like Ctrl-C in batch crash_after + 1 (its loss, `module.<loss_name>`, raises
    KeyboardInterrupt), then continues with --resume. `run(*extra_args)` calls the CLI on `out` and
    returns its exit code; with --save-steps 3 the crash leaves checkpoint-3 and nothing later."""
    real, calls = getattr(module, loss_name), []

    def crashing_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) > crash_after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(module, loss_name, crashing_loss)
    assert run() == 130
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    monkeypatch.undo()
    assert run("--resume") == 0
