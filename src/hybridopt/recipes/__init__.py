"""Recipes: one per command, the leaves that own a run. Only the CLI imports them (and benchmarks, through
`recipes.distill.run_distill`); everything they use lives in the library below.

* `distill.py`: `hybridopt distill` (`DistillRecipe`, `run_distill`).
* `teacher.py`: `hybridopt teacher`.
* `export_student.py`: `hybridopt export`.
* `generate.py`: `hybridopt generate`.
* `bench.py`: `hybridopt bench`.

May import: everything in the library (every subpackage but the CLI); not each other.
"""
