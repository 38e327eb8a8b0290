"""The README's Python examples run as written (in a scratch folder)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README should show the public API"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block.replace("10_000", "200"), str(README), "exec"), {})
