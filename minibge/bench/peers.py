"""The peers `minibge bench` times: each turns a checkpoint folder into encode(texts) → (N, D).

Every peer returns unit-length float32 numpy vectors in input order, so one table can compare
speed and agreement. The reference libraries are imported inside their builders only: minibge
itself never needs them, and a missing one makes its peer "skipped", nothing more.

    sentence-transformers   SentenceTransformer(folder).encode, its own batching (by characters)
    minibge encode          Embedder.encode as users get it: the fast backend (minibge/fast/)
    minibge plain           Embedder.encode with fast=False: minibge/model.py, sdpa or manual attention
    minibge fast ...        the fast path with one option changed or one speed mode added
    transformers            BertModel (SDPA) in FlagEmbedding's loop: sort by token count, pad per batch
    ONNX Runtime            transformers' BertModel exported to ONNX, with and without the BERT
                            graph optimizer (fused Attention, EmbedLayerNorm, BiasGelu, SkipLayerNorm),
                            and int8 by its dynamic quantisation
    OpenVINO                transformers' BertModel converted by openvino.convert_model from the torch
                            module (no ONNX file in between), fp32, the CPU's default precision (bf16
                            where the CPU has it), and int8 by NNCF's post-training quantisation
                            calibrated on a few hundred texts

The ONNX Runtime and OpenVINO peers run FlagEmbedding's loop (length_sorted_loop) on minibge's
tokenizer and pool with model.py's POOLING, so they differ from minibge only in the encoder.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..embedder import BATCH_SIZE as ENCODE_BATCH_SIZE
from ..embedder import length_sorted_batches, load_embedder
from ..model import POOLING, l2_normalize

logger = logging.getLogger(__name__)

BATCH_SIZE = 32  # the peers' texts per forward pass: sentence-transformers' default (minibge's rows: encode's own)


@dataclass
class Peer:
    name: str
    build: Callable          # (folder, embedder) -> encode(texts) -> np.ndarray
    encode: Callable | None = None
    skipped: str | None = None
    setup_s: float = 0.0
    times: dict = field(default_factory=dict)        # workload -> [seconds per round]
    memory: dict = field(default_factory=dict)       # workload -> peak extra MB
    vectors: dict = field(default_factory=dict)      # workload -> (N, D) from the first round


def minibge_peer(attn_impl: str):
    def build(folder, embedder):
        plain = load_embedder(folder, device="cpu", attn_impl=attn_impl, fast=False)
        return lambda texts: plain.encode(texts, batch_size=BATCH_SIZE)
    return build


def fast_peer(calibration: Callable | None = None, batch_size: int = ENCODE_BATCH_SIZE, **options):
    """minibge's fast path with FastEncoder options (encoder=) and speed_options (speed=); with
    calibration, speed_options(calibration=calibration()) (int8 smoothing). batch_size: texts per
    batch at most (encode's default, within its token budget, unless told)."""
    def build(folder, embedder):
        from ..fast import speed_options
        speed = {**options.get("speed", {}), **({"calibration": calibration()} if calibration else {})}
        fast = speed_options(load_embedder(folder, device="cpu").use_fast_path(**options.get("encoder", {})), **speed)
        return lambda texts: fast.encode(texts, batch_size=batch_size)
    return build


def pool_numpy(hidden, mask, pooling: str) -> np.ndarray:
    """model.py's pooling, then L2 normalisation, on a peer's (B, T, H) numpy output."""
    pooled = POOLING[pooling](torch.from_numpy(hidden), torch.from_numpy(mask))  # (B, H)
    return l2_normalize(pooled).numpy()


def length_sorted_loop(tokenize, run, texts, max_length, batch_size=BATCH_SIZE):
    """FlagEmbedding's encode loop: tokenize everything unpadded, sort by token count (longest first),
    pad each batch to its own longest text, run, restore the input order."""
    ids = tokenize(texts, max_length)
    out = None
    for rows in length_sorted_batches([len(x) for x in ids], batch_size):
        longest = max(len(ids[i]) for i in rows)
        input_ids = np.zeros((len(rows), longest), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for r, i in enumerate(rows):
            input_ids[r, :len(ids[i])], mask[r, :len(ids[i])] = ids[i], 1
        vectors = run(input_ids, mask)
        out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32) if out is None else out
        out[rows] = vectors
    return out


def transformers_peer(folder, embedder):
    """transformers' BertModel with SDPA, run as FlagEmbedding runs it (its own fast tokenizer)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()

    def run(input_ids, mask):
        with torch.inference_mode():
            hidden = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        return pool_numpy(hidden.numpy(), mask, embedder.pooling)

    tokenize = lambda texts, n: tokenizer(texts, truncation=True, max_length=n, padding=False)["input_ids"]
    return lambda texts: length_sorted_loop(tokenize, run, texts, embedder.max_length)


def sentence_transformers_peer(folder, embedder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return lambda texts: model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True)


class LastHiddenState(torch.nn.Module):
    """transformers' BertModel with plain tensor inputs and output, as the ONNX exporter wants it."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


def onnx_peer(optimize: bool, int8: bool = False):
    """ONNX Runtime on transformers' BertModel exported to ONNX, optionally through the BERT
    optimizer (fused Attention, EmbedLayerNormalization, BiasGelu, SkipLayerNormalization), and
    optionally quantised with onnxruntime.quantization.quantize_dynamic (int8 weights, activations
    quantised per batch at run time: what sentence-transformers' ONNX int8 backend does)."""
    def build(folder, embedder):
        import onnxruntime as ort
        import transformers

        work = Path(tempfile.mkdtemp(prefix="minibge-onnx-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        path = work / "model.onnx"
        bert = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
        model = LastHiddenState(bert)
        example = torch.ones(2, 8, dtype=torch.long)
        axes = {0: "batch", 1: "tokens"}
        with torch.no_grad():
            torch.onnx.export(model, (example, example, torch.zeros_like(example)), str(path), dynamo=False,
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["last_hidden_state"], opset_version=17,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                            "last_hidden_state": axes})
        if optimize:
            from onnxruntime.transformers.optimizer import optimize_model
            config = embedder.model.config
            optimized = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                                       hidden_size=config.hidden_size)
            logger.info("onnxruntime fused operators: %s", optimized.get_fused_operator_statistics())
            path = work / "model.optimized.onnx"
            optimized.save_model_to_file(str(path))
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantized = work / "model.int8.onnx"
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
            path = quantized
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(input_ids, mask):
            hidden = session.run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": mask,
                                                         "token_type_ids": np.zeros_like(input_ids)})[0]
            return pool_numpy(hidden, mask, embedder.pooling)

        tokenize = lambda texts, n: embedder.tokenizer.encode_batch(texts, n)
        return lambda texts: length_sorted_loop(tokenize, run, texts, embedder.max_length)
    return build


OPENVINO_INT8 = (None, "static", "weights")  # openvino_peer's int8 modes: none, NNCF's two


def openvino_peer(precision: str | None = "f32", int8: str | None = None, calibration: Callable = list,
                  batch_size: int = BATCH_SIZE):
    """OpenVINO on transformers' BertModel, converted as sentence-transformers' backend="openvino"
    converts it (optimum-intel's exporter): openvino.convert_model on the torch module, which traces it
    through OpenVINO's PyTorch frontend, inputs declared (batch, tokens) dynamic.

    precision: the CPU plugin's INFERENCE_PRECISION_HINT. I pin "f32" for the fp32 row because the
    plugin's default is bf16 on any CPU with native bf16 (AVX512-BF16 or AMX): what a user gets
    unpinned is the precision=None row. int8="static": nncf.quantize, post-training static quantisation with
    the settings optimum-intel's OVQuantizationConfig defaults to (transformer model type, the "mixed"
    preset: symmetric int8 weights, asymmetric activations; fast bias correction), calibrated on
    calibration() (a few hundred texts, each its own batch of one, unpadded); the ops NNCF leaves in
    float run at `precision`. int8="weights": nncf.compress_weights, OpenVINO's other int8 (what
    `optimum-cli export openvino --weight-format int8` writes: int8 weights, asymmetric per output
    channel, no calibration); the CPU plugin then quantises the activations at run time, each token's
    own in groups of DYNAMIC_QUANTIZATION_GROUP_SIZE input channels (its default, 32), and multiplies
    in int8. batch_size: texts per padded batch (length-sorted)."""
    if int8 not in OPENVINO_INT8:
        raise ValueError(f"int8 must be one of {OPENVINO_INT8}, got {int8!r}")

    def build(folder, embedder):
        import transformers
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("the OpenVINO peers need openvino: pip install 'minibge[bench]'") from None

        bert = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
        example = torch.ones(2, 8, dtype=torch.long)
        example_mask = example.clone()
        example_mask[1, 5:] = 0  # a padded row, so nothing mask-related is traced away as all ones
        with torch.no_grad():
            model = ov.convert_model(LastHiddenState(bert), example_input=(example, example_mask, torch.zeros_like(example)),
                                     input=[([-1, -1], ov.Type.i64)] * 3)  # (batch, tokens), both dynamic
        if int8:
            try:
                import nncf
            except ImportError:
                raise ImportError("the OpenVINO int8 peers need nncf: pip install 'minibge[bench]'") from None
        if int8 == "weights":
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        elif int8 == "static":
            texts = list(calibration())
            if not texts:
                raise ValueError("the OpenVINO int8 peer needs calibration texts (none found)")

            def one_text(text):
                ids = np.asarray(embedder.tokenizer.encode_batch([text], embedder.max_length), dtype=np.int64)  # (1, T)
                return [ids, np.ones_like(ids), np.zeros_like(ids)]

            model = nncf.quantize(model, nncf.Dataset(texts, one_text), subset_size=len(texts),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                                  fast_bias_correction=True)
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = ov.Core().compile_model(model, "CPU", config)
        runs = {None: "float", "static": "static int8", "weights": "int8 weights"}[int8]
        if int8 == "weights":
            runs += f", activations quantised in groups of {compiled.get_property('DYNAMIC_QUANTIZATION_GROUP_SIZE')} channels"
        logger.info("OpenVINO CPU plugin runs %s, the rest at %s", runs, compiled.get_property("INFERENCE_PRECISION_HINT"))
        request = compiled.create_infer_request()  # one request, reused: the bench encodes one batch at a time

        def run(input_ids, mask):
            hidden = request.infer([input_ids, mask, np.zeros_like(input_ids)])[0]  # (B, T, H), a copy
            return pool_numpy(hidden, mask, embedder.pooling)

        tokenize = lambda texts, n: embedder.tokenizer.encode_batch(texts, n)
        return lambda texts: length_sorted_loop(tokenize, run, texts, embedder.max_length, batch_size)
    return build


def all_peers(speed_options: bool = True, calibration: Callable = list) -> list[Peer]:
    """Every peer, the reference (sentence-transformers) first. calibration() gives the texts the
    OpenVINO int8 peer and minibge's smoothed int8 calibrate on (called only if one is built)."""
    peers = [Peer("sentence-transformers encode", sentence_transformers_peer),
             Peer("minibge encode (default: fast path)", fast_peer()),
             Peer(f"minibge encode, {BATCH_SIZE} texts a batch (the peers' batch)", fast_peer(batch_size=BATCH_SIZE)),
             Peer("minibge plain path (sdpa)", minibge_peer("sdpa")),
             Peer("minibge plain path (manual)", minibge_peer("manual")),
             Peer("transformers BertModel SDPA, FlagEmbedding loop", transformers_peer),
             Peer("ONNX Runtime, no graph optimizer", onnx_peer(optimize=False)),
             Peer("ONNX Runtime + BERT optimizer", onnx_peer(optimize=True)),
             Peer("ONNX Runtime int8 (dynamic quantisation)", onnx_peer(optimize=False, int8=True)),
             Peer("OpenVINO fp32", openvino_peer("f32")),
             # at minibge's default batch: packing makes a bigger batch cheaper, padding makes it dearer
             Peer(f"OpenVINO fp32, {ENCODE_BATCH_SIZE} texts a batch (minibge's batch)", openvino_peer("f32", batch_size=ENCODE_BATCH_SIZE)),
             Peer("OpenVINO, the CPU's default precision (bf16 where native)", openvino_peer(None)),
             Peer("OpenVINO int8 (NNCF static quantisation)", openvino_peer("f32", int8="static", calibration=calibration)),
             Peer("OpenVINO int8 weights, dynamic int8 activations", openvino_peer("f32", int8="weights"))]
    if speed_options:
        peers += [Peer("minibge fast (padded attention)", fast_peer(encoder={"attention": "padded"})),
                  Peer("minibge fast (nested attention)", fast_peer(encoder={"attention": "nested"})),
                  Peer("minibge fast (separate Q, K, V)", fast_peer(encoder={"fuse_qkv": False})),
                  Peer("minibge fast, oneDNN weights not prepacked", fast_peer(encoder={"prepack": False})),
                  Peer("minibge fast, MKL sgemm (no oneDNN)", fast_peer(encoder={"onednn": False})),
                  Peer("minibge fast + torch.compile", fast_peer(speed={"compile": True})),
                  Peer("minibge fast, bf16", fast_peer(speed={"precision": "bf16"})),
                  Peer("minibge fast, int8 (per-channel × per-token)", fast_peer(speed={"precision": "int8"})),
                  Peer("minibge fast, int8 smoothed (calibrated)", fast_peer(calibration, speed={"precision": "int8"}))]
    return peers
