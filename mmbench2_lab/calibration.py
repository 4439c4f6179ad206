"""Calibration: how well the hallucination predictors rank rollouts by their PSNR gain (paper §5, Fig. 5).

A calibration table has one row per evaluation sequence: ``task``, ``seq_idx``, one column per
sequence-level predictor (normalised u, e.g. ``u_r_norm``; higher = more hallucination-prone) and
``rollout_psnr_gain_db`` (ΔPSNR of the open-loop rollout over the repeat-last-frame floor; ΔPSNR < 0 is a
hallucination). The paper's base-model table ships as ``assets/calibration_perseq_base.csv``.

Statistics (all computed, never looked up), per predictor over the rows where it and ΔPSNR are finite:
pooled Spearman ρ(u, ΔPSNR), AUROC of u as a score for ΔPSNR < 0, the median ΔPSNR curve in decile bins of u
and the u where that curve crosses 0 dB. On the paper's table ρ = −0.808 / −0.785 / −0.796 (n = 8,775).

Beyond the paper: a combined predictor (rank mean or logistic model of the normalised predictors), scored
with whole tasks held out, so every figure it reports comes from tasks it was not fitted on.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mmbench2_lab.hallucination import PAPER_THRESHOLDS
from mmbench2_lab.tasks import UnknownTaskError, get_task

GAIN_COLUMN = "rollout_psnr_gain_db"
REQUIRED_COLUMNS = ("task", "seq_idx", GAIN_COLUMN)
# The paper's per-sequence CSV, in its column order; write_calibration_csv writes exactly these.
CALIBRATION_COLUMNS = ("task", "seq_idx", "action_shuffle_ratio", "u_r_norm", "u_f_norm", "u_s_norm",
                       GAIN_COLUMN)
# Ours, beyond the paper, written after the paper's columns when asked for: the round-trip residual of the
# last *real* context frame (how unfamiliar the scene is to the tokenizer), and the motion normaliser alone
# (1 / m: what a constant u scores once normalised, the baseline a normalised predictor has to beat).
CONTEXT_RESIDUAL_COLUMN = "u_r_context"
MOTION_BASELINE_COLUMN = "u_const_norm"
OPTIONAL_COLUMNS = (CONTEXT_RESIDUAL_COLUMN, MOTION_BASELINE_COLUMN)
HALLUCINATION_THRESHOLD_DB = 0.0  # ΔPSNR below this is a hallucination (scene divergence)
N_BINS = 10  # the paper's median curves: 10 equal-count bins of the predictor


COMBINERS = ("rank_mean", "logistic")
LOG_FLOOR = 1e-6  # the logistic combiner works on log u; u is a non-negative norm, clip it above 0 first


# ---------------------------------------------------------------------------------------------------------
# Loading and schema


def is_predictor_column(name: str) -> bool:
    """A predictor column is named ``u_*`` or ``*_norm`` (``u_r_norm``, ``u_x``, ``motion_norm``...)."""
    return name not in REQUIRED_COLUMNS and (name.startswith("u_") or name.endswith("_norm"))


def predictor_columns(df: pd.DataFrame, source: str = "calibration table") -> list[str]:
    """The table's predictor columns, in file order, after checking the schema.

    Raises ValueError naming a missing required column, a table without predictor columns, or a
    predictor/gain column that is not numeric.
    """
    expected = (f"expected columns {', '.join(REQUIRED_COLUMNS)} and at least one predictor column named "
                f"u_* or *_norm (the paper's table has {', '.join(CALIBRATION_COLUMNS)})")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(map(repr, missing))}; {expected}")
    predictors = [c for c in df.columns if is_predictor_column(str(c))]
    if not predictors:
        raise ValueError(f"{source}: no predictor column among {', '.join(map(str, df.columns))}; {expected}")
    for c in [*predictors, GAIN_COLUMN]:
        bad = [] if pd.api.types.is_numeric_dtype(df[c]) else [v for v in df[c] if not _is_number(v)]
        if bad:
            raise ValueError(f"{source}: column {c!r} must be numeric but holds {bad[0]!r}; "
                             "write missing values as nan")
    return predictors


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def load_calibration(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read a per-sequence calibration CSV (default: the paper's bundled base-model table) and check it."""
    if path is None:
        return paper_calibration()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration table at {path}; pass a CSV with columns "
                                f"{', '.join(CALIBRATION_COLUMNS)}")
    df = pd.read_csv(path)
    predictor_columns(df, source=str(path))
    return df


def paper_calibration() -> pd.DataFrame:
    """The paper's base-model table: 8,976 sequences of the 200 pretraining tasks (201 with nan u)."""
    with resources.as_file(resources.files("mmbench2_lab.assets") / "calibration_perseq_base.csv") as p:
        df = pd.read_csv(p)
    predictor_columns(df, source="bundled calibration_perseq_base.csv")
    return df


def write_calibration_csv(rows: Iterable[Mapping[str, object]], path: str | os.PathLike) -> Path:
    """Write rows (mappings with exactly ``CALIBRATION_COLUMNS``, optionally all with some of
    ``OPTIONAL_COLUMNS`` too) as a CSV in the paper's column order, ours after them.

    Written to a temporary file and renamed, so a reader never sees half a table. Returns the path.
    """
    path = Path(path)
    rows = list(rows)
    columns = CALIBRATION_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if rows and c in rows[0])
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        extra = [c for c in row if c not in columns]
        if missing or extra:
            raise ValueError(f"row {i}: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}; "
                             f"each row needs exactly {', '.join(columns)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------
# Per-predictor statistics


def finite_pairs(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(u, gain), each (n,), over the rows where both the predictor and ΔPSNR are finite."""
    u = df[column].to_numpy(dtype=float)
    gain = df[GAIN_COLUMN].to_numpy(dtype=float)
    keep = np.isfinite(u) & np.isfinite(gain)
    return u[keep], gain[keep]


def spearman_rho(u: np.ndarray, gain: np.ndarray) -> float:
    """Spearman ρ of (n,) scores against (n,) ΔPSNR, ties at average rank; nan if undefined."""
    from scipy.stats import spearmanr

    if len(u) < 2 or np.ptp(u) == 0 or np.ptp(gain) == 0:
        return math.nan
    return float(spearmanr(u, gain).statistic)


def hallucination_auroc(u: np.ndarray, gain: np.ndarray) -> float:
    """AUROC of (n,) scores u for the event ΔPSNR < 0 (ties count half); nan if one class is absent."""
    from sklearn.metrics import roc_auc_score

    label = gain < HALLUCINATION_THRESHOLD_DB
    if label.all() or not label.any():
        return math.nan
    return float(roc_auc_score(label, u))


def median_curve(u: np.ndarray, gain: np.ndarray, n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Median u and median ΔPSNR in ``n_bins`` equal-count bins of u; each (≤ n_bins,).

    Bin edges are the u quantiles; a bin holds u in (edge_k, edge_k+1] (the first also its lower edge), as
    ``pandas.qcut`` does, which reproduces the paper's published curves. Bins left empty by ties are dropped.
    """
    if len(u) == 0:
        return np.empty(0), np.empty(0)
    edges = np.quantile(u, np.linspace(0.0, 1.0, n_bins + 1))
    bin_of = np.searchsorted(edges[1:-1], u, side="left")
    filled = [b for b in range(n_bins) if (bin_of == b).any()]
    return (np.array([np.median(u[bin_of == b]) for b in filled]),
            np.array([np.median(gain[bin_of == b]) for b in filled]))


def zero_crossing(curve_u: np.ndarray, curve_gain: np.ndarray) -> float:
    """The u where a median curve first falls from ΔPSNR ≥ 0 to < 0, linearly interpolated; nan if never.

    On the paper's curves this gives ≈ 2.10 / 0.50 / 0.68, next to the thresholds 2.0 / 0.5 / 0.66.
    """
    for k in range(len(curve_u) - 1):
        g0, g1 = curve_gain[k] - HALLUCINATION_THRESHOLD_DB, curve_gain[k + 1] - HALLUCINATION_THRESHOLD_DB
        if g0 >= 0 > g1:
            return float(curve_u[k] + g0 / (g0 - g1) * (curve_u[k + 1] - curve_u[k]))
    return math.nan


@dataclass(frozen=True)
class PredictorStats:
    """Calibration of one predictor over its n finite rows."""
    name: str
    n: int
    spearman: float  # ρ(u, ΔPSNR); negative when high u means a worse rollout
    auroc: float  # u as a score for ΔPSNR < 0
    n_hallucinating: int  # rows with ΔPSNR < 0
    curve_u: tuple[float, ...]  # median u per decile bin
    curve_gain: tuple[float, ...]  # median ΔPSNR (dB) per decile bin
    zero_crossing: float  # u where the median curve crosses 0 dB

    def to_dict(self) -> dict:
        return asdict(self)


def predictor_stats(df: pd.DataFrame, column: str, n_bins: int = N_BINS) -> PredictorStats:
    """Spearman ρ, AUROC, decile median curve and zero crossing of one predictor column."""
    u, gain = finite_pairs(df, column)
    cu, cg = median_curve(u, gain, n_bins)
    return PredictorStats(
        name=column, n=len(u), spearman=spearman_rho(u, gain), auroc=hallucination_auroc(u, gain),
        n_hallucinating=int((gain < HALLUCINATION_THRESHOLD_DB).sum()),
        curve_u=tuple(map(float, cu)), curve_gain=tuple(map(float, cg)), zero_crossing=zero_crossing(cu, cg))


def calibration_stats(df: pd.DataFrame, n_bins: int = N_BINS) -> dict[str, PredictorStats]:
    """``predictor_stats`` for every predictor column of the table, keyed by column name."""
    return {c: predictor_stats(df, c, n_bins) for c in predictor_columns(df)}


def gain_range(df: pd.DataFrame, quantiles: tuple[float, float] = (0.05, 0.95)) -> tuple[float, float]:
    """The ``quantiles`` of a table's finite ΔPSNR: the range its rollouts span, ignoring the extreme 10%."""
    gain = df[GAIN_COLUMN].to_numpy(dtype=float)
    lo, hi = np.quantile(gain[np.isfinite(gain)], quantiles)
    return float(lo), float(hi)


def in_gain_range(df: pd.DataFrame, lo: float, hi: float) -> pd.DataFrame:
    """The rows whose ΔPSNR lies in [lo, hi].

    ρ depends on how wide a range of outcomes a table spans: the paper's base model spans about -20 to
    +26 dB, and its own ρ falls from -0.81 to about -0.4 on the rows within ±3 dB. Comparing a small model,
    whose rollouts span a few dB, with the paper's table cut to the same range (``gain_range``) separates
    "the predictors rank worse" from "there is less to rank".
    """
    gain = df[GAIN_COLUMN].to_numpy(dtype=float)
    return df[(gain >= lo) & (gain <= hi)]


def predictor_agreement(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Spearman ρ between each pair of predictor columns, over the rows where both are finite.

    Near 1, two predictors rank the sequences alike and are one signal, not two: on the paper's table the
    three normalised predictors agree at 0.97 to 0.99, so a normaliser they share (1 / m) can carry most of
    each one's ρ against ΔPSNR.
    """
    predictors = predictor_columns(df)
    out = {}
    for i, a in enumerate(predictors):
        for b in predictors[i + 1:]:
            u, v = df[a].to_numpy(dtype=float), df[b].to_numpy(dtype=float)
            keep = np.isfinite(u) & np.isfinite(v)
            out[(a, b)] = spearman_rho(u[keep], v[keep])
    return out


def per_task_stats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per task (table order): domain, n, hallucination rate, median ΔPSNR, and per predictor its
    median, ρ and AUROC (the medians compare tasks: a held-out task should score above the trained tasks
    of its domain).

    Columns: ``domain`` (empty for a task not in the catalogue), ``n``, ``hallucination_rate``,
    ``median_gain_db``, then ``<predictor>_median``, ``<predictor>_spearman`` and ``<predictor>_auroc``
    (nan where a task has too few finite rows or only one outcome class).
    """
    predictors = predictor_columns(df)
    out = {}
    for task, rows in df.groupby("task", sort=False):
        gain = rows[GAIN_COLUMN].to_numpy(dtype=float)
        gain = gain[np.isfinite(gain)]
        entry = {"domain": _domain(task), "n": len(rows),
                 "hallucination_rate": float(np.mean(gain < HALLUCINATION_THRESHOLD_DB)),
                 "median_gain_db": float(np.median(gain)) if len(gain) else math.nan}
        for c in predictors:
            u, g = finite_pairs(rows, c)
            entry[f"{c}_median"] = float(np.median(u)) if len(u) else math.nan
            entry[f"{c}_spearman"] = spearman_rho(u, g)
            entry[f"{c}_auroc"] = hallucination_auroc(u, g)
        out[task] = entry
    return pd.DataFrame.from_dict(out, orient="index").rename_axis("task")


def _domain(task: str) -> str:
    """The task's domain, or "" for a name outside the catalogue (tables may hold any task name)."""
    try:
        return get_task(task).domain
    except UnknownTaskError:
        return ""


# ---------------------------------------------------------------------------------------------------------
# Combined predictor, evaluated with tasks held out


def task_folds(tasks: Sequence[str], k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split rows into k folds by task: (train_rows, test_rows) index arrays, one pair per fold.

    ``tasks`` is (n,) task names, one per row. Each task's rows fall in exactly one test fold, and a fold
    never trains on a task it scores. Tasks are shuffled with ``seed`` and dealt into k near-equal groups.
    """
    tasks = np.asarray(tasks)
    unique = pd.unique(tasks)
    if not 2 <= k <= len(unique):
        raise ValueError(f"cannot hold out tasks in {k} folds with {len(unique)} distinct tasks; "
                         f"use 2 <= k <= {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    folds = []
    for held_out in np.array_split(unique[order], k):
        test = np.isin(tasks, held_out)
        folds.append((np.flatnonzero(~test), np.flatnonzero(test)))
    return folds


def rank_mean_score(train_u: np.ndarray, test_u: np.ndarray) -> np.ndarray:
    """Mean over predictors of each test value's rank among the training values (its empirical CDF).

    train_u (n_train, P), test_u (n_test, P) -> (n_test,) in [0, 1]. Ranking against the training rows
    (not the test rows) keeps scores from different folds on one scale.
    """
    _check_design(train_u, test_u)
    ecdf = [np.searchsorted(np.sort(train_u[:, j]), test_u[:, j], side="right") for j in range(train_u.shape[1])]
    return np.mean(ecdf, axis=0) / len(train_u)


def logistic_score(train_u: np.ndarray, train_gain: np.ndarray, test_u: np.ndarray) -> np.ndarray:
    """Log-odds of ΔPSNR < 0 from a logistic model of standardised log u, fitted on the training rows.

    train_u (n_train, P), train_gain (n_train,), test_u (n_test, P) -> (n_test,). The log and the
    standardisation (training mean and std) put the heavy-tailed predictors on a common scale.
    """
    from sklearn.linear_model import LogisticRegression

    _check_design(train_u, test_u)
    label = train_gain < HALLUCINATION_THRESHOLD_DB
    if label.all() or not label.any():
        raise ValueError("the training tasks hold only one outcome (all or no ΔPSNR < 0), so the logistic "
                         "combiner cannot be fitted; use fewer folds or the rank_mean combiner")
    x_train, x_test = np.log(np.maximum(train_u, LOG_FLOOR)), np.log(np.maximum(test_u, LOG_FLOOR))
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0
    model = LogisticRegression().fit((x_train - mean) / std, label)
    return model.decision_function((x_test - mean) / std)


def _check_design(train_u: np.ndarray, test_u: np.ndarray) -> None:
    if train_u.ndim != 2 or test_u.ndim != 2 or train_u.shape[1] != test_u.shape[1] or len(train_u) == 0:
        raise ValueError(f"expected train_u (n_train>0, P) and test_u (n_test, P), got {train_u.shape} and "
                         f"{test_u.shape}")


def combinable_rows(df: pd.DataFrame, predictors: Sequence[str] | None = None) -> np.ndarray:
    """(len(df),) bool: rows where every predictor and ΔPSNR are finite (what a combined score needs)."""
    predictors = list(predictors or predictor_columns(df))
    return np.isfinite(df[[*predictors, GAIN_COLUMN]].to_numpy(dtype=float)).all(axis=1)


def held_out_scores(df: pd.DataFrame, combiner: str = "logistic", k: int = 5, seed: int = 0,
                    predictors: Sequence[str] | None = None) -> pd.Series:
    """Combined predictor scores, each row scored by a combiner fitted only on other tasks' rows.

    Returns a float Series aligned with ``df.index``: higher = more hallucination-prone; nan on rows with a
    non-finite predictor or ΔPSNR. ``combiner`` is ``rank_mean`` or ``logistic``; folds from ``task_folds``.
    """
    if combiner not in COMBINERS:
        raise ValueError(f"unknown combiner {combiner!r}; choose one of {', '.join(COMBINERS)}")
    predictors = list(predictors or predictor_columns(df))
    keep = combinable_rows(df, predictors)
    rows = df[keep]
    u = rows[predictors].to_numpy(dtype=float)
    gain = rows[GAIN_COLUMN].to_numpy(dtype=float)
    score = np.empty(len(rows))
    for train, test in task_folds(rows["task"].to_numpy(), k, seed):
        if combiner == "rank_mean":
            score[test] = rank_mean_score(u[train], u[test])
        else:
            score[test] = logistic_score(u[train], gain[train], u[test])
    out = pd.Series(np.nan, index=df.index, name=f"combined_{combiner}")
    out[keep] = score
    return out


@dataclass(frozen=True)
class CombinedStats:
    """Held-out-task calibration of a combined predictor, next to the best single predictor on the same rows."""
    combiner: str
    n: int
    k: int  # folds; each fold's tasks are scored by a combiner fitted on the other folds' tasks
    spearman: float  # pooled over all held-out scores
    auroc: float
    fold_spearman: tuple[float, ...]
    fold_auroc: tuple[float, ...]
    best_single_by_spearman: str
    best_single_spearman: float
    best_single_by_auroc: str
    best_single_auroc: float

    @property
    def beats_best_single_spearman(self) -> bool:
        return self.spearman < self.best_single_spearman  # more negative = ranks ΔPSNR better

    @property
    def beats_best_single_auroc(self) -> bool:
        return self.auroc > self.best_single_auroc

    def to_dict(self) -> dict:
        return {**asdict(self), "held_out": "task",
                "beats_best_single_spearman": self.beats_best_single_spearman,
                "beats_best_single_auroc": self.beats_best_single_auroc}


def combined_stats(df: pd.DataFrame, combiner: str = "logistic", k: int = 5, seed: int = 0) -> CombinedStats:
    """Score every task with a combiner fitted on the other tasks; compare with the best single predictor.

    Needs at least two predictor columns. Single predictors need no fitting, so their figures on the same
    rows are the fair baseline (choosing the best of them on all rows only flatters the baseline).
    """
    predictors = predictor_columns(df)
    if len(predictors) < 2:
        raise ValueError(f"a combined predictor needs two or more predictor columns, the table has {predictors}")
    keep = combinable_rows(df, predictors)
    rows = df[keep]
    score = held_out_scores(df, combiner, k, seed, predictors)[keep].to_numpy()
    gain = rows[GAIN_COLUMN].to_numpy(dtype=float)
    fold_rho, fold_auc = [], []
    for _, test in task_folds(rows["task"].to_numpy(), k, seed):
        fold_rho.append(spearman_rho(score[test], gain[test]))
        fold_auc.append(hallucination_auroc(score[test], gain[test]))
    single = {c: predictor_stats(rows, c) for c in predictors}
    by_rho = min(single, key=lambda c: single[c].spearman)
    by_auc = max(single, key=lambda c: single[c].auroc)
    return CombinedStats(
        combiner=combiner, n=len(rows), k=k, spearman=spearman_rho(score, gain),
        auroc=hallucination_auroc(score, gain), fold_spearman=tuple(fold_rho), fold_auroc=tuple(fold_auc),
        best_single_by_spearman=by_rho, best_single_spearman=single[by_rho].spearman,
        best_single_by_auroc=by_auc, best_single_auroc=single[by_auc].auroc)


def calibration_report(df: pd.DataFrame, k: int = 5, seed: int = 0) -> dict:
    """JSON-ready report: ``{predictor: {"spearman", "auroc", "n"}, "combined_<combiner>": {...}}`` (nan -> None).

    Predictor keys are the table's column names. The combined entries (held-out-task figures) appear only
    where ``all_combined_stats`` can compute them.
    """
    report = {name: {"spearman": s.spearman, "auroc": s.auroc, "n": s.n}
              for name, s in calibration_stats(df).items()}
    for combiner, stats in all_combined_stats(df, k, seed).items():
        report[f"combined_{combiner}"] = stats.to_dict()
    return _nan_to_none(report)


def all_combined_stats(df: pd.DataFrame, k: int = 5, seed: int = 0) -> dict[str, CombinedStats]:
    """``combined_stats`` for every combiner, with at most one fold per task; empty when there is nothing to
    combine, hold out or fit: fewer than two predictor columns or tasks, or a single outcome (all or no
    ΔPSNR < 0)."""
    n_tasks = df["task"].nunique()
    gain = df[GAIN_COLUMN].to_numpy(dtype=float)
    hallucinating = gain[np.isfinite(gain)] < HALLUCINATION_THRESHOLD_DB
    one_outcome = hallucinating.all() or not hallucinating.any()
    if len(predictor_columns(df)) < 2 or n_tasks < 2 or one_outcome:
        return {}
    return {c: combined_stats(df, c, min(k, n_tasks), seed) for c in COMBINERS}


def _nan_to_none(obj):
    """Undefined statistics (nan) become JSON null rather than the non-standard NaN token."""
    if isinstance(obj, dict):
        return {key: _nan_to_none(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


# ---------------------------------------------------------------------------------------------------------
# Figures (plotly)


def calibration_figure(df: pd.DataFrame, overlay: pd.DataFrame | None = None,
                       names: tuple[str, str] = ("base", "overlay")):
    """Paper Fig. 5: one panel per predictor, u (log x) against ΔPSNR, decile median curve, 0 dB line.

    ``overlay``, e.g. a finetuned model's table, is drawn over ``df`` in every panel whose predictor it
    also has. ``names`` label the two tables in the legend. Returns a ``plotly.graph_objects.Figure``.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    predictors = predictor_columns(df)
    tables = [(names[0], df, "#7c3aed")]
    if overlay is not None:
        predictor_columns(overlay, source=names[1])
        tables.append((names[1], overlay, "#ea580c"))
    stats = {name: calibration_stats(t) for name, t, _ in tables}
    titles = [f"{c}: " + ", ".join(f"{name} ρ={stats[name][c].spearman:.3f}"
                                    for name, _, _ in tables if c in stats[name]) for c in predictors]
    fig = make_subplots(rows=1, cols=len(predictors), subplot_titles=titles, shared_yaxes=True)
    for col, c in enumerate(predictors, start=1):
        for name, table, color in tables:
            if c not in stats[name]:
                continue
            u, gain = finite_pairs(table, c)
            s = stats[name][c]
            first = col == 1
            fig.add_trace(go.Scattergl(x=u, y=gain, mode="markers", name=f"{name} sequences",
                                       legendgroup=f"{name}-points", showlegend=first,
                                       marker=dict(size=3, color=color, opacity=0.25)), row=1, col=col)
            fig.add_trace(go.Scatter(x=s.curve_u, y=s.curve_gain, mode="lines+markers",
                                     name=f"{name} decile median", legendgroup=f"{name}-curve",
                                     showlegend=first, line=dict(color=color, width=3)), row=1, col=col)
        fig.add_hline(y=HALLUCINATION_THRESHOLD_DB, line_dash="dash", line_color="gray", row=1, col=col)
        fig.update_xaxes(type="log", title_text=c, row=1, col=col)
    fig.update_yaxes(title_text="rollout ΔPSNR (dB)", row=1, col=1)
    fig.update_layout(title="Calibration: predictor vs rollout ΔPSNR (ΔPSNR < 0 = hallucination)",
                      height=420, width=380 * len(predictors))
    return fig


def per_frame_trace_figure(trace_dict: Mapping[str, Sequence[float]],
                           thresholds: Mapping[str, float] = PAPER_THRESHOLDS, fps: float = 15.0):
    """Per-frame predictor traces against their thresholds (the paper's run-time detection scrubber).

    ``trace_dict`` maps a predictor name (``u_r``, ``u_f``, ``u_s``) to its (T,) per-frame normalised
    values; every trace needs a threshold. One panel per predictor, time in seconds at ``fps``; frames at
    or above threshold are marked red. Returns a ``plotly.graph_objects.Figure``.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    traces = {name: np.asarray(v, dtype=float) for name, v in trace_dict.items()}
    if not traces:
        raise ValueError("trace_dict is empty; pass e.g. {'u_r': [...], 'u_f': [...], 'u_s': [...]}")
    missing = [name for name in traces if name not in thresholds]
    if missing:
        raise ValueError(f"no threshold for {missing}; thresholds has {sorted(thresholds)}")
    lengths = {name: v.shape for name, v in traces.items()}
    if any(len(s) != 1 for s in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(f"traces must be 1-D (T,) of one length, got shapes {lengths}")
    fig = make_subplots(rows=len(traces), cols=1, shared_xaxes=True, subplot_titles=list(traces))
    for row, (name, values) in enumerate(traces.items(), start=1):
        t = np.arange(len(values)) / fps
        over = values >= thresholds[name]
        fig.add_trace(go.Scatter(x=t, y=values, mode="lines", name=name, line=dict(color="#7c3aed")),
                      row=row, col=1)
        fig.add_trace(go.Scatter(x=t[over], y=values[over], mode="markers", name=f"{name} ≥ threshold",
                                 marker=dict(color="#dc2626", size=5)), row=row, col=1)
        fig.add_hline(y=thresholds[name], line_dash="dash", line_color="#dc2626", row=row, col=1,
                      annotation_text=f"threshold {thresholds[name]:g}")
        fig.update_yaxes(title_text=name, row=row, col=1)
    fig.update_xaxes(title_text="time (s)", row=len(traces), col=1)
    fig.update_layout(title="Per-frame hallucination predictors", height=220 * len(traces) + 80,
                      showlegend=False)
    return fig
