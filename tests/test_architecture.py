"""The package's shape: subpackages by concern, imports flowing one way between them (core -> quant, optim ->
export -> models -> data -> training -> bench, manager -> recipes -> CLI), recipes as leaves, no import cycles,
and the public API importable from the top of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hybridopt

PACKAGE = Path(hybridopt.__file__).parent

# Each unit (a subpackage, or a top-level module) may import the units of lower rank and itself, never higher.
# A unit not listed is rejected, so a new subpackage or top-level module gets a rank.
RANKS = {
    0: {"errors", "utils", "fileio", "reporting", "kmeans"},  # core: no concern of its own
    1: {"quant", "optim"},  # the quantizers and QAT layer; the optimizer and its controller
    2: {"config"},  # the run configs (commands' settings), composed from the components' fields
    3: {"export"},  # packed format and GGUF
    4: {"models"},  # teacher loading, student construction, tokenizers
    5: {"data"},  # corpus, splits, blocks, samplers, data clusters, the teacher-logit cache
    6: {"training"},  # the Trainer, objectives, evaluation, checkpoints, distributed, run layout
    7: {"bench", "manager"},  # the optimizer bench; the design document's facade
    8: {"recipes"},  # one per command
    9: {"cli"},
    10: {"__main__", "__init__"},
}
RANK_OF = {unit: rank for rank, units in RANKS.items() for unit in units}
# Library code takes plain arguments or its component's config (config.TrainConfig, StudentConfig, ...), never a
# command's run config; quant, optim, export and data import no config at all.
NO_CONFIG = {"quant", "optim", "export", "data"}
RUN_CONFIGS = {"DistillConfig", "TeacherConfig", "GenerateConfig", "InspectConfig", "ExportConfig", "BenchConfig"}
# The exceptions, each with its reason: the default teacher is defined as a `hybridopt teacher` run.
RUN_CONFIG_USERS = {("training.default_teacher", "TeacherConfig")}


def _modules() -> dict[str, Path]:
    """hybridopt module name (without `hybridopt.`) -> file."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _unit(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """Every hybridopt module `path` imports, at module level or inside functions (`hybridopt.` stripped)."""
    found, modules = set(), _modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybridopt"):
            base = node.module.removeprefix("hybridopt").lstrip(".")
            for alias in node.names:  # `from hybridopt.recipes import distill` imports hybridopt.recipes.distill
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("hybridopt.") for a in node.names if a.name.startswith("hybridopt.")}
    return {m for m in found if m and m != "__version__"}


def test_every_unit_has_a_rank():
    assert sorted({_unit(m) for m in _modules()} - set(RANK_OF)) == []


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.parent.name}/__init__.py's docstring does not say what it may import"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_flow_one_way(module):
    unit = _unit(module)
    if module == "__init__":
        return  # lazy re-exports of the library (PEP 562), checked by test_public_api
    for imported in _imports(_modules()[module]):
        other = _unit(imported)
        assert RANK_OF[other] <= RANK_OF[unit], f"{module} ({unit}, rank {RANK_OF[unit]}) imports {imported} ({other}, rank {RANK_OF[other]})"
        if RANK_OF[other] == RANK_OF[unit]:
            assert other == unit, f"{module} imports {imported}: {unit} and {other} are peers and stay apart"
        if imported.startswith("recipes.") and unit != "recipes":
            assert module == "cli", f"{module} imports the recipe {imported}: only the CLI may"
        if imported.startswith("recipes.") and unit == "recipes" and module != "recipes":
            # recipes are leaves: one may use only its own helper module, named after it (distill_resume)
            assert imported.startswith(module + "_"), f"{module} imports the recipe {imported}: move what they share to the library"
        if unit in NO_CONFIG:
            assert other != "config", f"{module} imports the configs: take plain arguments instead"


@pytest.mark.parametrize("module", sorted(m for m in _modules() if _unit(m) in ("models", "data", "training")))
def test_library_code_takes_components_not_run_configs(module):
    for node in ast.walk(ast.parse(_modules()[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "hybridopt.config":
            for alias in node.names:
                if alias.name in RUN_CONFIGS:
                    assert (module, alias.name) in RUN_CONFIG_USERS, (
                        f"{module} imports the run config {alias.name}: take its component config or plain arguments")


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
