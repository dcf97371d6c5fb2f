"""docs/research.md runs as written: its python blocks, in order, in one namespace, from the repo root.

Each block ends with an assert of what the page claims, so running them is the test.
"""
import re

import pytest
from conftest import REPO_ROOT

RESEARCH = REPO_ROOT / "docs" / "research.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


@pytest.mark.slow  # two model loads and two training steps: about 10 s on two cores
def test_research_page_runs_as_written(minilm_dir, monkeypatch):
    blocks = PYTHON_BLOCK.findall(RESEARCH.read_text(encoding="utf-8"))
    assert len(blocks) >= 6, f"expected the page's python blocks, found {len(blocks)}"
    monkeypatch.chdir(REPO_ROOT)  # the page loads weights/all-MiniLM-L6-v2 by relative path
    namespace = {"__name__": "__research__"}
    for number, code in enumerate(blocks, start=1):
        try:
            exec(compile(code, f"{RESEARCH.name}, python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{RESEARCH.name} python block {number} failed: {error!r}") from error
