"""Per-frame hallucination state from the normalised predictors: stable, drifting or hallucinating.

Two schemes, chosen by ``mode``:
- ``thresholds`` (the paper's run-time scrubber): fixed thresholds on the normalised values,
  u_r 2.0, u_f 0.5, u_s 0.66. A predictor at or above its threshold is hallucinating; at or above
  ``drift_fraction`` (0.6, ours) of it, drifting.
- ``zscore`` (the reference demo's overlay): the first ``calibration_steps`` (50) values after each reset
  form a per-episode baseline; then z = (u - median) / max(1.4826 MAD, max(0.05 |median|, 1e-8)), drifting
  from z >= 1, hallucinating from z >= 2.5. Until the baseline is full the state is ``calibrating``.
The frame's state is the worst over the predictors.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

STATES = ("calibrating", "stable", "drifting", "hallucinating")  # in increasing severity (calibrating < stable
_SEVERITY = {"stable": 0, "calibrating": 1, "drifting": 2, "hallucinating": 3}  # for the worst-of rule)
U_R_THRESHOLD, U_F_THRESHOLD, U_S_THRESHOLD = 2.0, 0.5, 0.66
PAPER_THRESHOLDS = {"u_r": U_R_THRESHOLD, "u_f": U_F_THRESHOLD, "u_s": U_S_THRESHOLD}  # on the *_norm values


def worst(states) -> str:
    return max(states, key=_SEVERITY.__getitem__, default="stable")


def threshold_state(value: float, threshold: float, drift_fraction: float = 0.6) -> str:
    if value >= threshold:
        return "hallucinating"
    return "drifting" if value >= drift_fraction * threshold else "stable"


def robust_z(value: float, baseline: list[float]) -> float:
    """(u - median) / max(1.4826 MAD, max(0.05 |median|, 1e-8)) over a baseline of values."""
    med = statistics.median(baseline)
    mad = statistics.median(abs(v - med) for v in baseline)
    return (value - med) / max(1.4826 * mad, max(0.05 * abs(med), 1e-8))


def zscore_state(z: float) -> str:
    return "hallucinating" if z >= 2.5 else "drifting" if z >= 1.0 else "stable"


@dataclass
class HallucinationMonitor:
    """Turns each frame's normalised predictor values into a state; ``reset()`` at every new episode."""
    mode: str = "thresholds"
    thresholds: dict = field(default_factory=lambda: dict(PAPER_THRESHOLDS))
    drift_fraction: float = 0.6
    calibration_steps: int = 50
    baseline: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("thresholds", "zscore"):
            raise ValueError(f"mode must be 'thresholds' or 'zscore', got {self.mode!r}")

    def reset(self) -> None:
        self.baseline = {}

    def update(self, values: dict) -> tuple[str, dict]:
        """values: {"u_r_norm": float, ...} -> (frame state, {"u_r": state, ...})."""
        per = {}
        for name, threshold in self.thresholds.items():
            if f"{name}_norm" not in values:
                continue
            v = float(values[f"{name}_norm"])
            if self.mode == "thresholds":
                per[name] = threshold_state(v, threshold, self.drift_fraction)
                continue
            base = self.baseline.setdefault(name, [])
            if len(base) < self.calibration_steps:
                base.append(v)
                per[name] = "calibrating"
            else:
                per[name] = zscore_state(robust_z(v, base))
        return worst(per.values()), per
