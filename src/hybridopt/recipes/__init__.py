"""Recipes: one per command, the leaves that own a run. Only the CLI imports them (and benchmarks, through
`recipes.distill.run_distill`); everything they use lives in the library below.

* `distill.py`: `hybridopt distill` and `hybridopt teacher-cache` (`DistillRecipe`, `run_distill`);
  `distill_resume.py` picks its run folder and, on `--resume`, its settings.
* `teacher.py`: `hybridopt teacher`.
* `export_student.py`: `hybridopt export`.
* `generate.py`: `hybridopt generate`.
* `bench.py`: `hybridopt bench`.

May import: everything in the library (every subpackage but the CLI); not each other (a recipe's own helper
module, named after it, is part of it).
"""
