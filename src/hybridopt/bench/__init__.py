"""The optimizer bench (`hybridopt bench`): its tasks, its arms (every optimizer compared, each with its schedule
and learning-rate grid), its statistics, its plots and its report (RESULTS.md). Runs are trained by the Trainer's step function.

May import: everything below the recipes.
"""
