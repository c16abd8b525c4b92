"""The test suite's data cache is a temporary folder (tests/conftest.py), not the user's."""

from __future__ import annotations

import os

from tiny_models import tokenizer as tiny_tokenizer

from deltatune.data import cache_root, load_datasets


def test_tests_cache_tokenized_data_in_a_temporary_folder(tmp_path):
    root = cache_root()
    assert os.path.realpath(root).startswith(os.path.realpath(str(tmp_path.parent)))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w3 w4", "label": "0"}\n{"text": "w5 w6", "label": "1"}\n')
    loaded = load_datasets(str(data), tiny_tokenizer(), task="seq-cls", eval_data=str(data))
    assert os.path.dirname(loaded.cache_path) == root and os.listdir(root) == [
        os.path.basename(loaded.cache_path)
    ]
