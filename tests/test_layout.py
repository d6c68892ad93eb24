"""One home per concern: every import under `hicache/` points down the layers, and the old paths still work.

Layers, lowest first: the caching core (`hicache/*.py`, `hicache/recipes/`), model ports (`hicache/models/`),
testbeds (`hicache/testbeds/`: trained testbeds and tiny builders), the experiment app (`hicache/app/`). A module
may import its own layer and the layers below it, never one above.
"""

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hicache"
LAYERS = ("core", "models", "testbeds", "app")

# old path -> new path: deprecated stubs kept for one release (they import upwards by design)
MOVED = {
    "hicache.testbed": "hicache.testbeds.flux_shapes",
    "hicache.testbed.build": "hicache.testbeds.flux_shapes.build",
    "hicache.testbed.checker": "hicache.testbeds.flux_shapes.checker",
    "hicache.testbed.dataset": "hicache.testbeds.flux_shapes.dataset",
    "hicache.testbed.train": "hicache.testbeds.flux_shapes.train",
    "hicache.tiny": "hicache.testbeds.tiny.flux",
    "hicache.tiny_video": "hicache.testbeds.tiny.hunyuan_video",
    "hicache.tables": "hicache.app.tables",
    "hicache.models.inf_dit.tiny": "hicache.testbeds.tiny.inf_dit",
    "hicache.models.inf_dit.sr_data": "hicache.testbeds.inf_dit_sr.data",
    "hicache.models.inf_dit.sr_testbed": "hicache.testbeds.inf_dit_sr.train",
    "hicache.models.inf_dit.sr_experiment": "hicache.app.sr_experiment",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS[1:] else "core"


def is_module(name: str, package: Path) -> bool:
    path = package.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every `hicache...` module the file imports, at any depth (lazy imports in functions count too)."""
    name = module_name(path, package)
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)  # `from hicache import testbeds` imports the module hicache.testbeds too:
            found |= {f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}", package)}
    return {m for m in found if m == "hicache" or m.startswith("hicache.")}


def upward_imports(package: Path = PACKAGE) -> list[str]:
    upward = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        if name in MOVED or name == "hicache._moved":
            continue
        for target in imported_modules(path, package):
            if target in MOVED:
                upward.append(f"{name} imports the deprecated path {target} (use {MOVED[target]})")
            elif LAYERS.index(layer(target)) > LAYERS.index(layer(name)):
                upward.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    return upward


def test_every_import_points_down():
    upward = upward_imports()
    assert not upward, "\n".join(upward)


def test_the_walk_reports_an_upward_import(tmp_path):
    """The check can fail: in a copy of the tree's shape, a core module that lazily imports the app is reported,
    and so is a model port importing a testbed with a relative import."""
    root = tmp_path / "hicache"
    for folder in ("app", "models/port", "testbeds"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "app" / "runner.py").write_text("from hicache import hooks\n")
    (root / "hooks.py").write_text("def f():\n    from .app import runner\n")
    (root / "testbeds" / "data.py").write_text("")
    (root / "models" / "port" / "model.py").write_text("from ...testbeds import data\n")
    assert sorted(upward_imports(root)) == [
        "hicache.hooks (core) imports hicache.app (app)", "hicache.hooks (core) imports hicache.app.runner (app)",
        "hicache.models.port.model (models) imports hicache.testbeds (testbeds)",
        "hicache.models.port.model (models) imports hicache.testbeds.data (testbeds)"]


def test_relative_imports_resolve_to_their_layer():
    assert "hicache.testbeds.flux_shapes.dataset" in imported_modules(PACKAGE / "testbeds" / "flux_shapes" / "checker.py")
    assert "hicache.testbeds.flux_shapes" in imported_modules(PACKAGE / "testbeds" / "inf_dit_sr" / "data.py") or \
        "hicache.testbeds.flux_shapes.dataset" in imported_modules(PACKAGE / "testbeds" / "inf_dit_sr" / "data.py")
    assert "hicache.app.errors" in imported_modules(PACKAGE / "app" / "main.py")


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_still_import_with_a_warning(old):
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    if old == "hicache.testbed":  # the old package re-exports the new one's public names
        assert module.TESTBED_DIR == new.TESTBED_DIR and module.check is new.check
    else:  # the same module object: classes and state are shared
        assert module is new


def test_shipped_weights_live_in_the_package():
    from hicache.testbeds import WEIGHTS_DIR

    assert WEIGHTS_DIR == PACKAGE / "testbeds" / "weights"
    assert (WEIGHTS_DIR / "flux_shapes" / "model_index.json").is_file()
    assert (WEIGHTS_DIR / "inf_dit_sr" / "testbed.json").is_file()
    assert not (PACKAGE.parent / "testbeds").exists()
