"""Encoding a long stream keeps memory flat: the issue's "200k sentences within 200 MB of 2k".

The fast path gives every batch its own packed row count, and oneDNN (with ideep over it) compiles
and caches one kernel per matmul shape: with their default 1024-entry caches, RSS grew by ~500 MB
over 200k texts. minibge/fast/onednn.py caps both caches just before its first oneDNN operation
(cap_kernel_caches); this test runs in a fresh process, as a user would, and checks the growth from
the first 2k texts to 40k more, all of different lengths.
"""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, random, resource, sys
    import torch
    import minibge
    from minibge import BertConfig, BertModel, Embedder, Tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_pretrained(sys.argv[1])
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128)
    embedder = Embedder(BertModel(config).eval(), tokenizer, max_length=256)
    words = "the a of cat dog sat on mat quickly jumps over lazy brown fox model vector".split()
    rng = random.Random(0)
    texts = lambda n: [" ".join(rng.choices(words, k=rng.randint(1, 80))) for _ in range(n)]
    peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    embedder.encode(texts(2000))
    after_2k = peak_mb()
    for _ in range(4):
        embedder.encode(texts(10_000))
    assert embedder.fast_path_blocker() is None
    print(json.dumps({"after_2k": after_2k, "after_42k": peak_mb()}))
""")


@pytest.mark.slow
def test_peak_memory_stays_flat_on_a_long_stream(minilm_dir):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(minilm_dir)], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    growth = peaks["after_42k"] - peaks["after_2k"]
    # uncapped caches: +330 MB by 60k texts; capped: +35 MB. 100 MB leaves room for the allocator.
    assert growth < 100, f"peak RSS grew by {growth:.0f} MB from 2k to 42k texts ({peaks})"
