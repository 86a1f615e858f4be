"""The hybrid optimizer's arguments: the bases it runs over, every range it accepts and the defaults that depend
on the base. Pure Python (no torch), so the command line's configs validate with the optimizer's own rules.
"""

from __future__ import annotations

BASES = ("adam", "sgd", "schedulefree", "muon")


def checked_arguments(*, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, base: str,
                       scale_lr: float, scale_betas: tuple[float, float], scale_threshold: float,
                       use_controller: bool | None, adapt_radius: bool, controller_lr: float,
                       controller_hidden: int, num_clusters: int, min_scale: float | None,
                       radius_start: float | None, muon_momentum: float
                       ) -> tuple[float, bool, float]:
    """Checks `HybridOptimizer`'s arguments (ValueError naming the bad one) and returns (min_scale,
    use_controller, radius_start) with the base's defaults filled in."""
    check(lr > 0, f"lr must be positive, got {lr}")
    check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two numbers in [0, 1), got {betas}")
    check(len(scale_betas) == 2 and all(0 <= b < 1 for b in scale_betas),
           f"scale_betas must be two numbers in [0, 1), got {scale_betas}")
    check(scale_lr > 0, f"scale_lr must be positive, got {scale_lr}")
    check(0 <= scale_threshold < 1, f"scale_threshold must be in [0, 1), got {scale_threshold}")
    check(eps >= 0, f"eps must be non-negative, got {eps}")
    check(weight_decay >= 0, f"weight_decay must be non-negative, got {weight_decay}")
    check(base in BASES, f"base must be one of {', '.join(BASES)}, got {base!r}")
    check(not (adapt_radius and base == "schedulefree"),
           "adapt_radius is not supported with base='schedulefree' (its step is not the update it predicts from)")
    check(controller_lr > 0, f"controller_lr must be positive, got {controller_lr}")
    check(controller_hidden >= 1, f"controller_hidden must be at least 1, got {controller_hidden}")
    check(num_clusters >= 0, f"num_clusters must be >= 0, got {num_clusters}")
    check(0 <= muon_momentum < 1, f"muon_momentum must be in [0, 1), got {muon_momentum}")
    min_scale, use_controller, radius_start = base_defaults(base, min_scale, use_controller, radius_start)
    check(0 <= radius_start <= 1, f"radius_start must be in [0, 1], got {radius_start}")
    check(1e-4 <= min_scale <= 1, f"min_scale must be in [1e-4, 1], got {min_scale}")
    return min_scale, use_controller, radius_start


def base_defaults(base: str, min_scale: float | None, use_controller: bool | None, radius_start: float | None
                  ) -> tuple[float, bool, float]:
    """(min_scale, use_controller, radius_start) with each None replaced by the base's default: over
    "schedulefree" a one-sided scale (1) and no controller; `radius_start` 0.25 over "schedulefree" and "muon",
    0 (off) otherwise."""
    if min_scale is None:
        min_scale = 1.0 if base == "schedulefree" else 1e-4
    if use_controller is None:
        use_controller = base != "schedulefree"
    if radius_start is None:
        radius_start = 0.25 if base in ("schedulefree", "muon") else 0.0
    return min_scale, use_controller, radius_start


def check(ok: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `ok` (messages start with the argument's name)."""
    if not ok:
        raise ValueError(message)
