"""Every installed command (pyproject [project.scripts]) resolves to a CLI main that answers --help."""
from __future__ import annotations

import importlib
import subprocess
import sys
import re
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
SECTION = PYPROJECT.read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
SCRIPTS = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', SECTION, re.M))  # (tomllib needs Python 3.11)


def test_the_documented_commands_are_installed():
    assert {"apex-train", "apex-plan", "apex-export", "apex-sample", "apex-prepare", "apex-fake-buffer",
            "apex-sweep-condition-shift", "apex-sweep-loss-weights"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_main_answers_help(name, capsys):
    module, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0 and "usage:" in capsys.readouterr().out


def test_sweep_script_runs_by_path_without_a_path_hack():
    root = PYPROJECT.parent
    proc = subprocess.run([sys.executable, str(root / "sweeps" / "condition_shift.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
