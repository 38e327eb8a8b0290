"""The layers import only downward (../shared/design/architecture.md): a module may import its own
layer and those below it, never one above. Read from the source with ast, so a lazy import inside
a function counts as much as one at the top of a file."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("apex_ray", "data_pipelines", "sweeps")

# Lowest first. The method runs without Ray; backbones and encoders wrap diffusers/transformers;
# the config types them; the engine is the per-worker loop (sharding, checkpoints, evaluation);
# data_pipelines holds the Ray Data jobs; orchestration drives Ray Train (and, for the embedded
# default, the data job below it); the CLIs sit on top, with the Tune sweeps above them all.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("method", ("apex_ray.method", "apex_ray.common", "apex_ray.shapeeval", "apex_ray.assets")),
    ("models", ("apex_ray.models",)),
    ("config", ("apex_ray.config",)),
    ("engine", ("apex_ray.engine",)),
    ("data jobs", ("data_pipelines",)),
    ("orchestration", ("apex_ray.orchestration",)),
    ("entry points", ("apex_ray.train", "apex_ray.sample", "apex_ray.export", "apex_ray.plan")),
    ("sweeps", ("sweeps",)),
]
PACKAGE_ROOTS = {"apex_ray": 0}  # `import apex_ray` (the version) is below everything


def layer_of(module: str) -> int | None:
    if module in PACKAGE_ROOTS:
        return PACKAGE_ROOTS[module]
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def upward_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        own = layer_of(module_name(path, root))
        assert own is not None, f"{module_name(path, root)} is in no layer: add it to LAYERS"
        for line, target in imported_modules(path):
            rank = layer_of(target)
            if rank is not None and rank > own:
                problems.append(f"{path.relative_to(root)}:{line} ({LAYERS[own][0]}) imports {target} "
                                f"({LAYERS[rank][0]})")
    return problems


def test_every_module_is_in_a_layer_and_no_import_goes_up():
    assert len(sources()) > 50
    assert upward_imports(sources()) == []


def test_the_method_runs_without_ray_or_distribution():
    method = [p for p in sources() if module_name(p).startswith("apex_ray.method")]
    offending = [f"{p.relative_to(ROOT)}:{line} imports {target}" for p in method
                 for line, target in imported_modules(p)
                 if target.split(".")[0] == "ray" or target.startswith("torch.distributed")]
    assert method and offending == []


def test_the_check_sees_an_upward_import(tmp_path):
    """Not vacuous: a method module importing the engine, even lazily inside a function, is reported."""
    probe = tmp_path / "apex_ray" / "method" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import torch\n\ndef f():\n    from apex_ray.engine.build import build_training\n")
    assert upward_imports([probe], root=tmp_path) == [
        "apex_ray/method/probe.py:4 (method) imports apex_ray.engine.build (engine)"]


@pytest.mark.parametrize("module, layer", [("apex_ray.method.objective", "method"),
                                           ("apex_ray.engine.build", "engine"),
                                           ("data_pipelines.prepare_latents", "data jobs"),
                                           ("sweeps.tuning", "sweeps")])
def test_layer_table(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
