"""The README holds true: its Python examples run as written (in a scratch folder), its layout table names the tree."""
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


def test_readme_layout_table_names_the_tree():
    """Every path in the layout table exists, and every package folder and module of apex_ray's
    top level is named in it."""
    text = README.read_text()
    table = text[text.index("## Layout"):text.index("## The method in code")]
    root = README.parent
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        paths = re.findall(r"`([^`]+)`", cell)
        folder = None
        for path in paths:
            full = path if "/" in path or folder is None else f"{folder}/{path}"
            folder = str(Path(full).parent) if "/" in path else folder
            assert (root / full).exists(), f"README layout names {full}, which does not exist"
            named.add(full.rstrip("/"))
    top = {f"apex_ray/{p.name}" for p in (root / "apex_ray").iterdir()
           if not p.name.startswith("_") and (p.is_dir() and p.name != "__pycache__" or p.suffix == ".py")}
    assert top - named == set(), "apex_ray entries the README layout does not name"
