"""docs/usage.md runs as written: every python block prints the text block under it, and the four
ways it shows (FlagModel, sentence-transformers, LangChain, transformers) give the same vectors, as do
the blocks after them (quantization, int8 matmuls, the saved index, ONNX export, mteb, LlamaIndex)."""
import contextlib
import io
import os
import re

import numpy as np
import pytest
from conftest import REPO_ROOT, require_module

import minibge

USAGE = REPO_ROOT / "docs" / "usage.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
FLOAT = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?")
PATHS = ("FlagModel", "sentence-transformers", "LangChain", "transformers")  # the page's sections, in order
# then "Beyond the four ways": each block ends with q_embeddings and p_embeddings too
BEYOND = ("quantization and similarity", "int8 matmuls", "saved index", "ONNX export", "mteb", "LlamaIndex")


def usage_examples() -> list[tuple[str, str]]:
    """(python code, the output printed under it) for every python block of docs/usage.md."""
    blocks = FENCE.findall(USAGE.read_text(encoding="utf-8"))
    examples = []
    for i, (lang, code) in enumerate(blocks):
        if lang == "python":
            following = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
            assert following[0] == "text", f"python block {len(examples)} of {USAGE} has no ```text output under it"
            examples.append((code, following[1]))
    return examples


def same_output(printed: str, documented: str, atol: float = 2e-4) -> bool:
    """Equal text, except that decimal numbers may differ by atol (the last printed digit, across
    machines) and numpy's column padding may change with them."""
    def skeleton(text):
        return re.sub(r"\s+", " ", FLOAT.sub("#", text)).replace("[ ", "[").replace(" ]", "]").strip()
    ours, theirs = [float(x) for x in FLOAT.findall(printed)], [float(x) for x in FLOAT.findall(documented)]
    return skeleton(printed) == skeleton(documented) and len(ours) == len(theirs) and \
        np.allclose(ours, theirs, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def usage_run(minilm_dir, tmp_path_factory):
    """Run the page in a scratch folder that has weights/all-MiniLM-L6-v2: [(namespace, stdout)] per block.

    The first block sets up `queries` and `passages`; as the page says, each later block starts
    from those two names only, so a snippet that leans on another one's variables fails here.
    """
    for module in ("sentence_transformers", "transformers", "langchain_core", "onnxruntime", "mteb",
                   "llama_index.core"):
        require_module(module)
    folder = tmp_path_factory.mktemp("usage")
    (folder / "weights").mkdir()
    (folder / "weights" / "all-MiniLM-L6-v2").symlink_to(minilm_dir, target_is_directory=True)
    here, runs = os.getcwd(), []
    os.chdir(folder)
    try:
        for code, _ in usage_examples():
            namespace = {"__name__": "__usage__"}
            if runs:
                namespace.update(queries=runs[0][0]["queries"], passages=runs[0][0]["passages"])
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, f"{USAGE}:block{len(runs)}", "exec"), namespace)
            runs.append((namespace, stdout.getvalue()))
    finally:
        os.chdir(here)
    return folder, runs


@pytest.mark.slow  # loads the model five ways: ~15 s on one idle core
def test_every_block_prints_what_the_page_says(usage_run):
    _, runs = usage_run
    examples = usage_examples()
    assert len(runs) == len(examples) == 1 + len(PATHS) + len(BEYOND)
    for i, ((_, printed), (_, documented)) in enumerate(zip(runs, examples)):
        assert same_output(printed, documented), \
            f"block {i} of {USAGE} printed\n{printed}\nbut the page says\n{documented}"


@pytest.mark.slow
def test_the_four_ways_give_the_same_vectors(usage_run):
    folder, runs = usage_run
    reference = minibge.load_embedder(folder / "bge-style-minilm")
    expected = {"q_embeddings": reference.encode_queries(runs[0][0]["queries"]),
                "p_embeddings": reference.encode_corpus(runs[0][0]["passages"])}
    assert len(runs) == 1 + len(PATHS) + len(BEYOND)
    for name, (namespace, _) in zip(PATHS + BEYOND, runs[1:]):
        for key, want in expected.items():
            got = np.asarray(namespace[key], dtype=np.float64)
            assert got.shape == want.shape, f"{name} {key}: shape {got.shape}, expected {want.shape}"
            cosines = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
            assert cosines.min() >= 0.99999, f"{name} {key}: min cosine {cosines.min():.8f} with minibge's " \
                f"encode, max |diff| {np.abs(got - want).max():.3e}"
    # the agreement includes the instruction: without it the query vectors are clearly different
    bare = reference.encode(runs[0][0]["queries"])
    assert (bare * expected["q_embeddings"]).sum(-1).max() < 0.999


def test_same_output_tolerates_only_the_last_digit():
    assert same_output("[[0.7469 0.1]]\n", "[[0.747  0.1   ]]")
    assert not same_output("[[0.7469 0.1]]", "[[0.7459 0.1]]")
    assert not same_output("[[0.7469 0.1]]", "[[0.7469 0.1 0.2]]")
    assert not same_output("(384,) float32", "(384,) float16")
