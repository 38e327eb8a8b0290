"""Every installed command (pyproject [project.scripts]) resolves to a CLI main that answers --help."""
from __future__ import annotations

import argparse
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


def _parsers_of(name: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parsers command ``name`` builds, caught as it starts parsing (nothing runs)."""
    parsers = []

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        parsers.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    module, function = SCRIPTS[name].split(":")
    with pytest.raises(Caught):
        getattr(importlib.import_module(module), function)([])
    return parsers


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_of_every_command_has_help(name, monkeypatch):
    missing = [action.option_strings or action.dest for parser in _parsers_of(name, monkeypatch)
               for action in _actions(parser) if not action.help]
    assert not missing, f"{name}: no help for {missing}"


def test_export_names_a_checkpoint_that_does_not_exist(tmp_path, capsys):
    from apex_ray.export import main

    assert main([str(tmp_path / "missing" / "step_0000200"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'missing' / 'step_0000200'} does not exist" in err and "step_*" in err
