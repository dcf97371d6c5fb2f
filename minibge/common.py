"""Small helpers that several parts of minibge share, each written once: reading JSON side files.

(Reading text/jsonl lines and the distributed rank/world helpers join this module in the layout
redesign; see the README's file tree.)
"""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path, default=None):
    """The parsed JSON file at `path`, or `default` when there is no such file.

    A model folder's side files (modules.json, tokenizer_config.json, ...) are optional, so a missing
    one is not an error; a present one that does not parse is (json.JSONDecodeError, a ValueError).
    """
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))
