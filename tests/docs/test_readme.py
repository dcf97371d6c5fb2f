"""The README's Python blocks run exactly as written, so a new user's first contact works.

Each ```python block runs on its own (a reader may paste any one of them), from a fresh folder
laid out like a fresh clone after `python weights/fetch_minilm.py`: a weights/ folder holding
all-MiniLM-L6-v2. Whatever a block writes (save_pretrained) lands in that temporary folder, and
the Hub points at a closed port, so a block that needed the network would fail here, not pass.
"""
import re

import pytest

from conftest import REPO_ROOT
from test_hub import dead_url

README = REPO_ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks():
    blocks = PYTHON_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python blocks"
    return blocks


@pytest.mark.parametrize("number", range(len(python_blocks())), ids=lambda n: f"block{n + 1}")
def test_readme_python_block_runs_as_written(number, minilm_dir, tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / minilm_dir.name).symlink_to(minilm_dir)  # what a fresh clone has after the set-up
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIBGE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("MINIBGE_HUB_URL", dead_url())
    block = python_blocks()[number]
    exec(compile(block, f"README.md python block {number + 1}", "exec"), {"__name__": "__readme__"})


TREE_BLOCK = re.compile(r"^```\n(minibge/\n.*?)^```", re.DOTALL | re.MULTILINE)
TREE_LINE = re.compile(r"^((?:│   |    )*)[├└]── (\S+)")


def readme_tree() -> set[str]:
    """The paths the README's file tree names, e.g. "minibge/fast/onednn.py"."""
    blocks = TREE_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "README.md should have one ``` block that starts with the line minibge/"
    paths, parents = set(), ["minibge"]
    for line in blocks[0].splitlines()[1:]:
        match = TREE_LINE.match(line)
        assert match, f"not a tree line: {line!r}"
        depth, name = len(match.group(1)) // 4 + 1, match.group(2)
        parents[depth:] = [name.rstrip("/")]
        paths.add("/".join(parents))
    return paths


def test_readme_tree_names_every_module():
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "minibge").rglob("*.py")}
    named = {p for p in readme_tree() if p.endswith(".py")}
    assert not modules - named, f"modules missing from the README's file tree: {sorted(modules - named)}"
    assert not named - modules, f"the README's file tree names files that do not exist: {sorted(named - modules)}"
