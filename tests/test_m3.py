"""BGE-M3 (minibge/m3.py, minibge.BGEM3FlagModel; issue 21, items 1-3): the official folder layout in and out,
the three outputs and the scores against an independent reference built from transformers.XLMRobertaModel plus
the two Linears by the formulas, and the head files read as untrusted.

The checkpoint is random, with bge-m3's shape shrunk to two layers and a small Unigram vocabulary (8194
positions kept), LayerNorms and both heads perturbed, saved by transformers and torch.save exactly as
FlagEmbedding saves BAAI/bge-m3.
"""
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require_module
from rerank_fixtures import hf_xlmr_model, shrunk, write_xlmr_tokenizer

import minibge
from minibge.m3 import HEAD_FILES, load_m3

transformers = require_module("transformers")

TEXTS = ["the cat sat on the mat", "what is a panda?", "The giant panda is a bear species endemic to China. " * 3,
         "hello world", "机器学习很有趣", "emoji 😀 🎉 are fun, naïve café", "query passage score the the the",
         "BGE rerankers are cross-encoders"]
PAIRS = [(TEXTS[1], TEXTS[2]), (TEXTS[0], TEXTS[6]), (TEXTS[3], TEXTS[4]), (TEXTS[5], TEXTS[7]), (TEXTS[2], TEXTS[1])]


def heads(hidden: int, seed: int = 1):
    """colbert_linear (H→H) and sparse_linear (H→1), pushed away from their init (bias shifted so that
    relu keeps about half of the token weights)."""
    torch.manual_seed(seed)
    colbert, sparse = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        colbert.weight.add_(0.05 * torch.randn_like(colbert.weight))
        colbert.bias.add_(0.1 * torch.randn_like(colbert.bias))
        sparse.weight.mul_(3.0)
        sparse.bias.fill_(0.05)
    return colbert.eval(), sparse.eval()


def write_m3_folder(folder, safetensors: bool = True):
    """The official BAAI/bge-m3 layout: transformers' XLMRobertaModel files, the two .pt heads, the tokenizer."""
    config = shrunk("bge-m3")
    hf = hf_xlmr_model(config)
    if safetensors:
        hf.save_pretrained(folder)
    else:  # the pickled layout BAAI/bge-m3 itself ships (transformers 5 writes safetensors only)
        hf.config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    colbert, sparse = heads(config.hidden_size)
    torch.save(colbert.state_dict(), folder / "colbert_linear.pt")
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    tok = write_xlmr_tokenizer(folder, model_max_length=8192)
    return hf, colbert, sparse, tok


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bge-m3")
    hf, colbert, sparse, tok = write_m3_folder(folder)
    return folder, hf, colbert, sparse, tok


# -----------------------------------------------------------------------------
# The independent reference: transformers + the formulas, one padded batch

def reference_outputs(hf, colbert, sparse, tok, texts, max_length=8192):
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        dense = F.normalize(h[:, 0], dim=-1)
        weights = torch.relu(sparse(h)).squeeze(-1)
        vecs = F.normalize(colbert(h[:, 1:]) * batch["attention_mask"][:, 1:, None], dim=-1)
    unused = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    lexical, multi = [], []
    for row, (ids, mask) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"])):
        d = {}
        for w, i in zip(weights[row].tolist(), ids):
            if i not in unused and w > 0:
                d[str(i)] = max(d.get(str(i), 0.0), w)
        lexical.append(d)
        multi.append(vecs[row, : int(mask.sum()) - 1].numpy())
    return dense.numpy(), lexical, multi


def assert_lexical_equal(ours, ref):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys(), f"text {i}: keys differ: {sorted(set(a) ^ set(b))}"
        diff = max((abs(a[k] - b[k]) for k in a), default=0.0)
        assert diff <= 1e-5, f"text {i}: max |diff| of lexical weights {diff:.3e}"


def assert_colbert_equal(ours, ref):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"text {i}: shape {a.shape} vs {b.shape}"
        diff = np.abs(a - b).max()
        assert diff <= 1e-5, f"text {i}: max |diff| of ColBERT vectors {diff:.3e}, mean {np.abs(a - b).mean():.3e}"


@pytest.mark.parametrize("fast", [True, False])
def test_three_outputs_match_the_reference(m3, fast):
    folder, hf, colbert, sparse, tok = m3
    model = load_m3(folder, device="cpu", fast=fast)
    out = model.encode(TEXTS, batch_size=3, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    dense, lexical, multi = reference_outputs(hf, colbert, sparse, tok, TEXTS)
    diff = np.abs(out["dense_vecs"] - dense).max()
    assert diff <= 1e-5, f"dense: max |diff| {diff:.3e}"
    assert_lexical_equal(out["lexical_weights"], lexical)
    assert_colbert_equal(out["colbert_vecs"], multi)
    n_tokens = sum(len(tok(t)["input_ids"]) - 2 for t in TEXTS)
    assert 10 < sum(map(len, lexical)) < n_tokens, "the heads are perturbed so that relu keeps some weights, not all"


def test_truncation_as_transformers(m3):
    folder, hf, colbert, sparse, tok = m3
    model = load_m3(folder, device="cpu")
    out = model.encode(TEXTS, batch_size=4, max_length=6, return_sparse=True, return_colbert_vecs=True)
    dense, lexical, multi = reference_outputs(hf, colbert, sparse, tok, TEXTS, max_length=6)
    assert np.abs(out["dense_vecs"] - dense).max() <= 1e-5
    assert_lexical_equal(out["lexical_weights"], lexical)
    assert_colbert_equal(out["colbert_vecs"], multi)
    assert max(v.shape[0] for v in out["colbert_vecs"]) == 5, "6 tokens, <s> dropped"


def reference_scores(hf, colbert, sparse, tok, pairs, weights):
    q_dense, q_lex, q_col = reference_outputs(hf, colbert, sparse, tok, [a for a, _ in pairs], 512)
    p_dense, p_lex, p_col = reference_outputs(hf, colbert, sparse, tok, [b for _, b in pairs], 512)
    w1, w2, w3 = weights
    result = {k: [] for k in ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")}
    for i in range(len(pairs)):
        d = float(q_dense[i] @ p_dense[i])
        s = sum(w * p_lex[i][t] for t, w in q_lex[i].items() if t in p_lex[i])
        c = float(np.mean([max(float(qv @ pv) for pv in p_col[i]) for qv in q_col[i]]))
        result["dense"].append(d)
        result["sparse"].append(s)
        result["colbert"].append(c)
        result["sparse+dense"].append((w2 * s + w1 * d) / (w1 + w2))
        result["colbert+sparse+dense"].append((w3 * c + w2 * s + w1 * d) / (w1 + w2 + w3))
    return result


@pytest.mark.parametrize("weights", [None, [0.4, 0.2, 0.4], [1.0, 0.3, 1.0]])
def test_compute_score_every_mode(m3, weights):
    folder, hf, colbert, sparse, tok = m3
    flag = minibge.BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
    kwargs = {} if weights is None else {"weights_for_different_modes": weights}
    ours = flag.compute_score(PAIRS, batch_size=2, **kwargs)
    ref = reference_scores(hf, colbert, sparse, tok, PAIRS, weights or [1.0, 1.0, 1.0])
    assert set(ours) == set(ref)
    for mode in ref:
        diff = np.abs(np.array(ours[mode]) - np.array(ref[mode])).max()
        assert diff <= 1e-5, f"{mode}: max |diff| {diff:.3e}; ours {ours[mode]}, reference {ref[mode]}"
    one = flag.compute_score(list(PAIRS[0]), **kwargs)
    assert all(isinstance(one[m], float) and abs(one[m] - ref[m][0]) <= 1e-5 for m in ref)


def test_flag_model_api(m3):
    folder, hf, colbert, sparse, tok = m3
    flag = minibge.BGEM3FlagModel(str(folder), use_fp16=True, devices=["cpu"])
    out = flag.encode(TEXTS[:3], batch_size=2)
    assert out["lexical_weights"] is None and out["colbert_vecs"] is None and out["dense_vecs"].shape == (3, 1024)
    assert out["dense_vecs"].dtype == np.float32
    out = flag.encode(TEXTS[:3], return_dense=False, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"] is None
    lw = out["lexical_weights"]
    m = flag.compute_lexical_matching_score(lw[0], lw[1])
    assert m == pytest.approx(sum(w * lw[1][t] for t, w in lw[0].items() if t in lw[1]))
    matrix = flag.compute_lexical_matching_score(lw, lw)
    assert matrix.shape == (3, 3) and matrix[0, 1] == pytest.approx(m)
    c = flag.colbert_score(out["colbert_vecs"][0], out["colbert_vecs"][1])
    ref = (out["colbert_vecs"][0] @ out["colbert_vecs"][1].T).max(axis=1).mean()
    assert float(c) == pytest.approx(float(ref), abs=1e-6)
    tokens = flag.convert_id_to_token(lw[0])
    assert set(tokens.values()) <= set(lw[0].values()) and all(isinstance(t, str) for t in tokens)
    expected = {tok.decode([int(i)]) for i in lw[0]}
    assert set(tokens) == expected
    single = flag.encode(TEXTS[0], return_sparse=True)
    assert single["dense_vecs"].shape == (1024,) and isinstance(single["lexical_weights"], dict)


def test_pytorch_model_bin_layout(tmp_path):
    hf, colbert, sparse, tok = write_m3_folder(tmp_path, safetensors=False)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    out = load_m3(tmp_path, device="cpu").encode(TEXTS[:4], batch_size=2, return_sparse=True, return_colbert_vecs=True)
    dense, lexical, multi = reference_outputs(hf, colbert, sparse, tok, TEXTS[:4])
    assert np.abs(out["dense_vecs"] - dense).max() <= 1e-5
    assert_lexical_equal(out["lexical_weights"], lexical)
    assert_colbert_equal(out["colbert_vecs"], multi)


def test_save_and_reload_equal_outputs(m3, tmp_path):
    folder, *_ = m3
    model = load_m3(folder, device="cpu")
    before = model.encode(TEXTS, batch_size=3, return_sparse=True, return_colbert_vecs=True)
    out = model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", *HEAD_FILES.values(), "tokenizer.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"
    for name in HEAD_FILES.values():  # plain tensors: loadable with weights_only=True, as FlagEmbedding reads them
        state = torch.load(out / name, weights_only=True)
        assert set(state) == {"weight", "bias"}
    after = load_m3(out, device="cpu").encode(TEXTS, batch_size=3, return_sparse=True, return_colbert_vecs=True)
    assert np.array_equal(before["dense_vecs"], after["dense_vecs"])
    assert before["lexical_weights"] == after["lexical_weights"]
    assert all(np.array_equal(a, b) for a, b in zip(before["colbert_vecs"], after["colbert_vecs"]))
    hf = transformers.XLMRobertaModel.from_pretrained(out)  # the encoder part is transformers' own layout
    assert hf.config.max_position_embeddings == 8194


def test_missing_head_is_an_error_only_when_asked(m3, tmp_path):
    folder, *_ = m3
    import shutil
    copy = tmp_path / "no-colbert"
    shutil.copytree(folder, copy)
    (copy / "colbert_linear.pt").unlink()
    model = load_m3(copy, device="cpu")
    out = model.encode(TEXTS[:2], return_sparse=True)  # dense and sparse do not need the ColBERT head
    assert out["dense_vecs"].shape == (2, 1024) and len(out["lexical_weights"]) == 2
    with pytest.raises(ValueError, match="no colbert_linear.pt"):
        model.encode(TEXTS[:2], return_colbert_vecs=True)
    with pytest.raises(ValueError, match="no colbert_linear.pt"):
        model.compute_score(PAIRS[:1])
    with pytest.raises(ValueError, match="holds a colbert_linear.pt"):  # an old head would survive beside new weights
        model.save_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "colbert_linear.pt").exists() and (tmp_path / "saved" / "sparse_linear.pt").exists()


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_head_files_are_untrusted(m3, tmp_path):
    folder, *_ = m3
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with open(bad / "sparse_linear.pt", "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(ValueError, match="could not read .*sparse_linear.pt"):
        load_m3(bad, device="cpu")
    torch.save({"weight": torch.zeros(1, 1024)}, bad / "sparse_linear.pt")  # no bias
    with pytest.raises(ValueError, match="missing .*bias"):
        load_m3(bad, device="cpu")
    torch.save({"weight": torch.zeros(1, 1000), "bias": torch.zeros(1)}, bad / "sparse_linear.pt")
    with pytest.raises(ValueError, match="shape"):
        load_m3(bad, device="cpu")


# -----------------------------------------------------------------------------
# minibge encode --m3 --sparse --colbert

def test_cli_encode_m3_writes_every_output(m3, tmp_path):
    from minibge.cli import main

    folder, *_ = m3
    lines = TEXTS[:5] + [""] + TEXTS[5:]  # a blank line is an empty text, row 6
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vec.npy"
    assert main(["encode", "--m3", "--sparse", "--colbert", "-m", str(folder), "--device", "cpu",
                 "--input", str(source), "--output", str(out), "--batch-size", "3"]) == 0
    ref = load_m3(folder, device="cpu").encode(lines, return_sparse=True, return_colbert_vecs=True)
    assert np.array_equal(np.load(out), ref["dense_vecs"])
    rows = [json.loads(line) for line in (tmp_path / "vec.sparse.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, len(lines) + 1))
    assert [r["weights"] for r in rows] == ref["lexical_weights"]
    vecs, offsets = np.load(tmp_path / "vec.colbert.npy"), np.load(tmp_path / "vec.colbert_offsets.npy")
    assert offsets.dtype == np.int64 and len(offsets) == len(lines) + 1 and offsets[-1] == len(vecs)
    for i, expected in enumerate(ref["colbert_vecs"]):
        assert np.array_equal(vecs[offsets[i]:offsets[i + 1]], expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_cli_encode_m3_dense_only_and_errors(m3, tmp_path, capsys):
    from minibge.cli import main

    folder, *_ = m3
    out = tmp_path / "d.npy"
    assert main(["encode", "--m3", "-m", str(folder), "--device", "cpu", "a cat", "a dog", "--output", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy"] and np.load(out).shape == (2, 1024)
    assert main(["encode", "--sparse", "-m", str(folder), "a cat", "--output", str(tmp_path / "x.npy")]) == 2
    assert "add --m3" in capsys.readouterr().err
    assert main(["encode", "--m3", "-m", str(folder), "a cat", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "FILE.npy" in capsys.readouterr().err


def test_docs_m3_python_block_runs(m3, tmp_path):
    """docs/m3.md's usage block runs as written, on the random checkpoint in place of the real one."""
    from conftest import REPO_ROOT

    folder, *_ = m3
    text = (REPO_ROOT / "docs" / "m3.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == 1
    code = blocks[0].replace("path/to/bge-m3", str(folder)).replace("runs/copy", str(tmp_path / "copy"))
    namespace = {}
    exec(compile(code, "docs/m3.md python block", "exec"), namespace)
    assert namespace["out"]["dense_vecs"].shape == (2, 1024)
    assert (tmp_path / "copy" / "colbert_linear.pt").exists()


# -----------------------------------------------------------------------------
# evaluate/m3.py: every mode's score matrix, and the metrics

def test_score_matrices_equal_compute_score(m3):
    from minibge.evaluate.m3 import m3_retrieval, score_matrices
    from minibge.evaluate.tasks import retrieval_metrics

    folder, *_ = m3
    model = load_m3(folder, device="cpu")
    queries, docs = TEXTS[:3], TEXTS[3:]
    matrices = score_matrices(model, queries, docs, batch_size=2, weights=[0.4, 0.2, 0.4])
    pairs = [(q, d) for q in queries for d in docs]
    ref = model.compute_score(pairs, batch_size=4, weights_for_different_modes=[0.4, 0.2, 0.4])
    for mode, matrix in matrices.items():
        expected = np.array(ref[mode]).reshape(len(queries), len(docs))
        assert np.abs(matrix - expected).max() <= 1e-5, f"{mode}: max |diff| {np.abs(matrix - expected).max():.3e}"
    corpus = {f"d{j}": {"title": "", "text": d} for j, d in enumerate(docs)}
    qs = {f"q{i}": q for i, q in enumerate(queries)}
    qrels = {"q0": {"d1": 1}, "q1": {"d0": 1, "d4": 1}, "q2": {"d3": 1}}
    metrics = m3_retrieval(model, corpus, qs, qrels, k_values=(1, 3), batch_size=2, weights=[0.4, 0.2, 0.4])
    for mode, matrix in matrices.items():
        results = {f"q{i}": {f"d{j}": float(matrix[i, j]) for j in range(len(docs))} for i in range(len(queries))}
        assert metrics[mode] == pytest.approx(retrieval_metrics(qrels, results, (1, 3))), mode
