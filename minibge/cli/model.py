"""Which model a `minibge` command uses, loading it, and describing it (see cli/__init__.py).

The model is ``--model/-m`` (a folder or a Hub id), else $MINIBGE_MODEL, else the first of
DEFAULT_MODELS found in the weights folder. The choice, and where the files came from, is
announced on stderr, so a result on stdout is never ambiguous about what produced it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .. import hub
from .args import Formatter, examples, hub_id
from .io import PROG, CliError, UsageError, interactive
from ..weights import PYTORCH_NAME, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME

MODEL_ENV = "MINIBGE_MODEL"
DEFAULT_MODELS = ("bge-small-en-v1.5", "bge-base-en-v1.5", "all-MiniLM-L6-v2")


def _pick_model(arg: str | None) -> tuple[str, str]:
    """(name or path, how it was chosen)."""
    if arg:
        return arg, "--model"
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], f"${MODEL_ENV}"
    weights = hub.default_weights_dir()
    for name in DEFAULT_MODELS:
        if (weights / name / "config.json").is_file():
            return str(weights / name), f"default: first model found in {weights}"
    raise CliError(f"no model given (--model or ${MODEL_ENV}) and none of {', '.join(DEFAULT_MODELS)} is in "
                   f"{weights}; get one with `python weights/fetch_minilm.py` or "
                   f"`minibge download BAAI/bge-small-en-v1.5`")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def _resolve(model: str | None) -> tuple[Path, str]:
    """The model's local folder, and a sentence saying where it came from."""
    name, how = _pick_model(model)
    path = Path(name).expanduser()
    if path.is_dir():
        return path, f"local folder ({how})"
    # "org/name" is a relative path too: I say which reading won, so a mistyped path
    # (`-m weights/all-MiniLM-L6-v2` from another folder) is never silently taken for a Hub id.
    already = hub.is_hub_id(name) and (hub.local_folder(name) / "config.json").is_file()
    if hub.is_hub_id(name) and not already and interactive():
        print(f"{PROG}: no folder {path.absolute()}; downloading {name} from the Hub into "
              f"{hub.default_weights_dir()}", file=sys.stderr)
    folder = hub.resolve_model_path(name)  # a HubError that speaks of both readings when neither works
    verb = "found in" if already else "downloaded into"
    return folder, (f"no folder {path.absolute()}, so Hub id {name!r}, {verb} the weights folder "
                    f"{hub.default_weights_dir()} ({how})")


def load(args, query_instruction: str | None = None, announce: bool = True):
    """Resolve, announce on stderr, and load the embedder; returns (embedder, folder, origin).

    announce=False skips the line on stderr: under torchrun only rank 0 says which model it is.
    """
    from ..embedder import load_embedder

    _check_device(args.device)
    if getattr(args, "int8_calibration", None) and not args.int8:
        raise UsageError("--int8-calibration goes with --int8")
    if getattr(args, "int8", False) and (args.plain or (args.dtype or "float32") != "float32"):
        raise UsageError("--int8 runs the fast path on float32 weights: leave out --plain and --dtype")
    folder, origin = _resolve(args.model)
    if announce:
        print(f"{PROG}: model {folder.name} from {folder} [{origin}]", file=sys.stderr)
    embedder = load_embedder(folder, device=args.device, dtype=args.dtype,
                             max_length=getattr(args, "max_length", None),  # `info` has no --max-length
                             query_instruction=query_instruction,
                             fast=not getattr(args, "plain", False))  # `info` has no --plain
    if getattr(args, "int8", False):
        use_int8(embedder, args)
    return embedder, folder, origin


def use_int8(embedder, args) -> None:
    """--int8 [--int8-calibration PATH]: speed_options(precision="int8") on the loaded embedder."""
    from ..common import iter_lines
    from ..fast import speed_options

    calibration = args.int8_calibration
    try:
        if calibration is not None and not calibration.endswith(".safetensors"):
            calibration = [text for _, text in iter_lines(calibration, "--int8-calibration", skip_blank=True)]
        speed_options(embedder, precision="int8", calibration=calibration)
    except ValueError as err:
        raise CliError(str(err)) from None


def load_m3_model(args, announce: bool = True):
    """load() for a BGE-M3 folder (m3.load_m3: the encoder and its heads); returns (m3, folder, origin)."""
    from ..m3 import load_m3

    _check_device(args.device)
    if getattr(args, "int8", False) or getattr(args, "int8_calibration", None):
        raise UsageError("--int8 is for dense embedders (the fast path); BGE-M3 runs in float")
    folder, origin = _resolve(args.model)
    if announce:
        print(f"{PROG}: M3 model {folder.name} from {folder} [{origin}]", file=sys.stderr)
    m3 = load_m3(folder, device=args.device, dtype=args.dtype, max_length=getattr(args, "max_length", None))
    return m3, folder, origin


def describe(embedder, folder: Path, origin: str) -> list[tuple[str, object]]:
    """(field, value) rows for `minibge info`: architecture, size, pooling, origin."""
    config = embedder.model.config
    n_params = sum(p.numel() for p in embedder.model.parameters())
    has_pooler = getattr(embedder.model, "pooler", None) is not None
    weights = next((f for f in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME)
                    if (folder / f).is_file()), "?")  # the order weights.read_state_dict tries them in
    instruction = embedder.query_instruction
    return [
        ("model", folder.name),
        ("folder", str(folder.resolve())),
        ("source", origin),
        ("weights file", weights),
        ("hidden size", config.hidden_size),
        ("layers", config.num_hidden_layers),
        ("attention heads", f"{config.num_attention_heads} (head dim {config.head_dim})"),
        ("intermediate size", config.intermediate_size),
        ("activation", config.hidden_act),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("max positions", config.max_position_embeddings),
        ("parameters", f"{n_params:,}" + (" (incl. pooler)" if has_pooler else " (no pooler)")),
        ("embedding dim", embedder.dimension),
        ("pooling", embedder.pooling),
        ("max length", f"{embedder.max_length} tokens"),
        ("query instruction", repr(instruction) if instruction else "(none)"),
        ("device", f"{embedder.device}, {next(embedder.model.parameters()).dtype}".replace("torch.", "")),
    ] + backend_rows(embedder)


def backend_rows(embedder) -> list[tuple[str, str]]:
    """Which path encode() takes and, on the fast backend, its kernels: the fp32 matmul route, the
    attention route and the short-group attention, with the timings that chose them on this machine."""
    blocker = embedder.fast_path_blocker()
    if blocker is not None:
        return [("encode runs", f"the plain model ({blocker})")]
    return [("encode runs", "the fast backend")] + embedder.fast_encoder.kernel_report()


# ---------------------------------------------------------------- the commands
def add_model_commands(commands, verbose, model, model_only) -> None:
    """Add download, info and export to the subparsers."""

    def command(name, help, description, epilog, parents=(verbose, model)):
        return commands.add_parser(name, help=help, description=description, epilog=epilog,
                                   parents=list(parents), formatter_class=Formatter)

    p = command("download", "fetch a model from the Hugging Face Hub",
                "Download the files minibge needs (config, tokenizer, sentence-transformers settings, "
                "one copy of the weights) into DIR, by default the weights folder. Interrupted "
                "downloads resume; complete files are checked and skipped. $MINIBGE_HUB_URL or "
                "$HF_ENDPOINT names a mirror; $HF_TOKEN is sent for private models.",
                examples("minibge download BAAI/bge-small-en-v1.5",
                          "minibge download BAAI/bge-base-en-v1.5 --dest /data/models/bge-base --revision main"),
                parents=(verbose,))
    p.add_argument("repo_id", metavar="REPO_ID", type=hub_id, help="Hub model id, e.g. BAAI/bge-small-en-v1.5")
    p.add_argument("--dest", metavar="DIR", help="target folder (default: <weights folder>/<model name>)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.set_defaults(run=cmd_download)

    p = command("info", "describe a model: architecture, parameters, pooling, origin",
                "Load a model and print its configuration, parameter count, pooling, maximum "
                "length, query instruction, and where its files came from.",
                examples("minibge info", "minibge info -m weights/all-MiniLM-L6-v2",
                          "minibge info -m BAAI/bge-small-en-v1.5", "minibge info --remeasure"),
                parents=(verbose, model_only))
    p.add_argument("--remeasure", action="store_true",
                   help="forget this machine's cached kernel choices (kernels.json under $MINIBGE_CACHE_DIR, "
                        "else ~/.cache/minibge) and measure them again: for choices made while other work "
                        "loaded the machine")
    p.set_defaults(run=cmd_info)

    p = command("export", "export a model to ONNX (encoder + pooling + normalisation)",
                "Write the model as one ONNX graph: input_ids and attention_mask (batch, sequence) int64 in, "
                "unit-length sentence_embedding (batch, D) float32 out, both axes dynamic. After export the "
                "file is run in ONNX Runtime on real texts and compared with encode (cosine >= 0.99999), "
                "then renamed into place. Needs onnx and onnxruntime.",
                examples("minibge export -m weights/all-MiniLM-L6-v2 --onnx minilm.onnx"),
                parents=(verbose, model_only))
    p.add_argument("--onnx", metavar="FILE", required=True, help="the .onnx file to write")
    p.set_defaults(run=cmd_export)


def cmd_download(args) -> int:
    folder = hub.download(args.repo_id, dest=args.dest, revision=args.revision, progress=interactive())
    print(folder)
    return 0


def cmd_export(args) -> int:
    from ..integrations.onnx import export_onnx
    from .io import check_writable

    check_writable(args.onnx, "--onnx")
    if args.device not in (None, "cpu") or args.dtype not in (None, "float32"):
        raise CliError("export runs on the CPU in float32; leave out --device and --dtype")
    args.device = "cpu"
    embedder, _, _ = load(args)
    path = export_onnx(embedder, Path(args.onnx).expanduser())
    print(f"wrote {path} (checked in ONNX Runtime against encode: cosine >= 0.99999)")
    return 0


def cmd_info(args) -> int:
    forgotten = []
    if args.remeasure:  # before load(): the fast backend's kernels are chosen as it is built
        from ..fast import kernels
        forgotten = [("kernel cache", f"{kernels.forget_machine()} choice(s) of this machine forgotten "
                                      f"in {kernels.cache_file()}, measured again")]
    rows = describe(*load(args)) + forgotten
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
