"""The package's shape: imports flow one way (library -> training -> recipes -> CLI), recipes are
leaves, there are no import cycles, and the public API imports from the top of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hybridopt

PACKAGE = Path(hybridopt.__file__).parent

# Lower layers never import higher ones. Modules not listed are rejected, so a new module gets a layer.
LAYERS = {
    0: {"errors", "bits", "utils", "quantizers", "packing", "losses", "kmeans", "corpus", "tokenizer", "checkpoint",
        "metrics", "reporting", "controller", "config", "bench_stats"},
    1: {"dataset", "data", "modeling", "evaluation", "hybrid_optimizer", "manager", "qat", "sampler", "export",
        "precision_plan", "data_clusters", "quant_report", "generate", "layout", "teacher_cache", "gguf",
        "bench_arms", "bench_plots", "distributed"},
    2: {"training", "teacher", "bench_tasks"},
    3: {"recipes", "recipes.distill", "recipes.export_student", "recipes.teacher", "recipes.bench"},
    4: {"cli", "__main__", "__init__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__") if rel.name == "__init__" and rel.parts[:-1] else ".".join(rel.parts)
        mods[name] = path
    return mods


def _imports(path: Path) -> set[str]:
    """Every hybridopt module `path` imports, at module level or inside functions (`hybridopt.` stripped)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridopt"):
            base = node.module.removeprefix("hybridopt").lstrip(".")
            for alias in node.names:  # `from hybridopt.recipes import distill` imports hybridopt.recipes.distill
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in LAYER_OF else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("hybridopt.") for a in node.names if a.name.startswith("hybridopt.")}
    return {m for m in found if m}


def test_every_module_has_a_layer():
    assert sorted(set(_modules()) - set(LAYER_OF)) == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_flow_one_way(module):
    layer = LAYER_OF[module]
    if module == "__init__":
        return  # lazy re-exports of the library (PEP 562), checked by test_public_api
    for imported in _imports(_modules()[module]):
        assert LAYER_OF[imported] <= layer, f"{module} (layer {layer}) imports {imported} (layer {LAYER_OF[imported]})"
        if imported.startswith("recipes") and imported != "recipes":
            assert module == "cli", f"{module} imports the recipe {imported}: only the CLI may"


def test_no_import_cycles():
    graph = {m: _imports(p) - {"__init__"} for m, p in _modules().items()}
    done, active = set(), []

    def visit(m):
        assert m not in active, "import cycle: " + " -> ".join(active[active.index(m):] + [m])
        if m in done:
            return
        active.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        active.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_layer_check_catches_a_library_module_importing_a_recipe(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hybridopt.recipes.distill import run_distill\n")
    assert "recipes.distill" in _imports(bad)


def test_public_api():
    for name in hybridopt.__all__:
        assert getattr(hybridopt, name) is not None
    from hybridopt import AuxiliaryNN, ClusterStratifiedBatchSampler, HybridOptimizer, QATConfig, quantize_  # noqa: F401

    with pytest.raises(AttributeError):
        hybridopt.not_a_name  # noqa: B018
