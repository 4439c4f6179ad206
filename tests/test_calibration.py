"""Calibration statistics, the calibration-report command and the held-out-task combined predictor."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmbench2_lab.calibration import (CALIBRATION_COLUMNS, GAIN_COLUMN, PAPER_THRESHOLDS, calibration_figure,
                                      calibration_stats, combined_stats, held_out_scores, load_calibration,
                                      median_curve, paper_calibration, per_frame_trace_figure, per_task_stats,
                                      predictor_agreement, task_folds, write_calibration_csv, zero_crossing)
from mmbench2_lab.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "calibration_perseq_base.csv"
PAPER_RHO = {"u_r_norm": -0.808, "u_f_norm": -0.785, "u_s_norm": -0.796}
PAPER_AUROC = {"u_r_norm": 0.913, "u_f_norm": 0.895, "u_s_norm": 0.893}  # shared/data/README.md


@pytest.fixture(scope="module")
def paper():
    return paper_calibration()


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _ranks(values):
    """Average ranks (1-based; ties share the mean of their positions), by hand."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def _auroc(score, gain):
    """P(score of a hallucinating row > score of a non-hallucinating row), ties counting half, by pairs."""
    pos = [s for s, g in zip(score, gain) if g < 0]
    neg = [s for s, g in zip(score, gain) if g >= 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---- the paper's table ------------------------------------------------------------------------------------


def test_bundled_table_is_the_shared_source_file():
    if not SHARED.exists():
        pytest.skip("shared/ not beside the repository")
    from importlib import resources
    bundled = resources.files("mmbench2_lab.assets") / "calibration_perseq_base.csv"
    assert bundled.read_bytes() == SHARED.read_bytes()


def test_paper_table_loads_with_its_three_predictors(paper):
    assert list(paper.columns) == list(CALIBRATION_COLUMNS)
    assert len(paper) == 8976 and paper["task"].nunique() == 200
    assert paper[["u_r_norm", "u_f_norm", "u_s_norm"]].isna().all(axis=1).sum() == 201


def test_cli_on_bundled_table_reproduces_paper_rho_and_auroc(capsys):
    assert main(["calibration-report"]) == 0
    out = capsys.readouterr().out
    for name in PAPER_RHO:
        line = next(line for line in out.splitlines() if line.startswith(name))
        n, rho, auroc = line.split()[1:4]
        assert (int(n), float(rho), float(auroc)) == (8775, PAPER_RHO[name], PAPER_AUROC[name])
    assert "rank_mean" in out and "logistic" in out and "fitted on other tasks" in out


def test_cli_json_is_keyed_by_the_csv_predictor_columns(capsys):
    assert main(["calibration-report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {*PAPER_RHO, "combined_rank_mean", "combined_logistic"}
    for name in PAPER_RHO:
        assert set(report[name]) == {"spearman", "auroc", "n"}
        assert round(report[name]["spearman"], 3) == PAPER_RHO[name]
        assert round(report[name]["auroc"], 3) == PAPER_AUROC[name]
        assert report[name]["n"] == 8775
    for key in ("combined_rank_mean", "combined_logistic"):
        c = report[key]
        assert c["held_out"] == "task" and c["n"] == 8775 and c["k"] == 5 and len(c["fold_spearman"]) == 5
        assert -1 <= c["spearman"] < -0.7 and 0.85 < c["auroc"] <= 1
        assert c["best_single_by_spearman"] == "u_r_norm"
        assert c["beats_best_single_spearman"] == (c["spearman"] < report["u_r_norm"]["spearman"])
        assert c["beats_best_single_auroc"] == (c["auroc"] > c["best_single_auroc"])


def test_paper_median_curves_match_the_published_points(paper):
    published = {  # paper Fig. 5 (data/calibration.js): (median u, median dPSNR dB) per decile bin
        "u_r_norm": [(0.255, 8.94), (0.387, 5.80), (0.512, 6.01), (0.762, 4.21), (1.103, 1.88), (1.351, 2.07),
                     (1.788, 0.47), (2.551, -0.69), (3.957, -3.38), (7.500, -7.68)],
        "u_f_norm": [(0.087, 8.67), (0.129, 7.30), (0.173, 4.73), (0.223, 2.85), (0.281, 2.78), (0.343, 1.82),
                     (0.437, 0.47), (0.599, -0.70), (0.913, -2.87), (1.814, -7.41)],
        "u_s_norm": [(0.116, 9.60), (0.182, 7.24), (0.247, 4.98), (0.325, 3.33), (0.404, 2.20), (0.484, 1.88),
                     (0.602, 0.36), (0.810, -0.62), (1.200, -2.75), (2.193, -7.31)],
    }
    stats = calibration_stats(paper)
    for name, points in published.items():
        assert np.allclose(stats[name].curve_u, [p[0] for p in points], atol=1e-3)
        assert np.allclose(stats[name].curve_gain, [p[1] for p in points], atol=1.5e-2)


def test_paper_curves_cross_zero_near_the_detection_thresholds(paper):
    stats = calibration_stats(paper)
    assert PAPER_THRESHOLDS == {"u_r": 2.0, "u_f": 0.5, "u_s": 0.66}
    for name, crossing in {"u_r_norm": 2.10, "u_f_norm": 0.50, "u_s_norm": 0.68}.items():
        assert stats[name].zero_crossing == pytest.approx(crossing, abs=0.01)


# ---- synthetic tables with known answers -------------------------------------------------------------------


def test_spearman_and_auroc_match_hand_computation_with_ties(tmp_path):
    u = [0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 0.2, 5.0, float("nan")]
    gain = [4.0, 2.0, 3.0, -1.0, 1.0, 1.0, -2.0, -2.0, 6.0, 0.5, -80.0]
    rows = [(f"t{i % 3}", i, 1.0, a, 2 * a, -a, g) for i, (a, g) in enumerate(zip(u, gain))]
    path = _write(tmp_path / "ties.csv", CALIBRATION_COLUMNS, rows)
    stats = calibration_stats(load_calibration(path))
    fu, fg = u[:-1], gain[:-1]  # the nan row is dropped
    rho = _pearson(_ranks(fu), _ranks(fg))
    assert stats["u_r_norm"].n == 10 and stats["u_r_norm"].n_hallucinating == 3
    assert stats["u_r_norm"].spearman == pytest.approx(rho, abs=1e-12)
    assert stats["u_r_norm"].auroc == pytest.approx(_auroc(fu, fg), abs=1e-12)
    assert stats["u_f_norm"].spearman == pytest.approx(rho, abs=1e-12)  # monotone transform: same ranks
    assert stats["u_s_norm"].spearman == pytest.approx(-rho, abs=1e-12)
    assert stats["u_s_norm"].auroc == pytest.approx(1 - _auroc(fu, fg), abs=1e-12)


def test_strictly_decreasing_relation_gives_rho_minus_one_and_auroc_one(tmp_path):
    u = np.linspace(0.1, 3.0, 40)
    rows = [(f"t{i % 4}", i, 1.0, x, x ** 2, math.exp(x), 5.0 - 3.0 * x) for i, x in enumerate(u)]
    stats = calibration_stats(load_calibration(_write(tmp_path / "mono.csv", CALIBRATION_COLUMNS, rows)))
    for s in stats.values():
        assert s.spearman == pytest.approx(-1.0) and s.auroc == pytest.approx(1.0) and s.n == 40


def test_decile_curve_and_zero_crossing_on_a_linear_relation():
    u = np.arange(1.0, 21.0)  # 10 bins of two values each
    curve_u, curve_gain = median_curve(u, 10.0 - u)
    assert np.allclose(curve_u, np.arange(1.5, 21.0, 2.0))
    assert np.allclose(curve_gain, 10.0 - curve_u)
    assert zero_crossing(curve_u, curve_gain) == pytest.approx(10.0)
    assert math.isnan(zero_crossing(curve_u, curve_gain + 100.0))  # never crosses


def test_renamed_predictor_columns_are_discovered_and_keyed_by_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 2.0, 60)
    rows = [(f"task{i % 6}", i, x[i] + rng.normal(0, 0.1), x[i] * 3, 2.0 - 2 * x[i]) for i in range(60)]
    path = _write(tmp_path / "model.csv", ["task", "seq_idx", "u_round_trip", "motion_norm", GAIN_COLUMN], rows)
    assert main(["calibration-report", str(path), "--json", "--folds", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"u_round_trip", "motion_norm", "combined_rank_mean", "combined_logistic"}
    assert report["motion_norm"]["spearman"] == pytest.approx(-1.0)
    assert report["motion_norm"]["auroc"] == pytest.approx(1.0)
    assert report["combined_logistic"]["k"] == 3


@pytest.mark.parametrize("drop", [GAIN_COLUMN, "task", "seq_idx"])
def test_missing_column_error_names_it_and_lists_the_expected_ones(tmp_path, capsys, drop):
    header = [c for c in CALIBRATION_COLUMNS if c != drop]
    path = _write(tmp_path / "bad.csv", header, [["t"] * len(header)])
    with pytest.raises(ValueError, match=rf"missing column\(s\) '{drop}'.*expected columns task, seq_idx"):
        load_calibration(path)
    assert main(["calibration-report", str(path)]) == 2
    assert f"'{drop}'" in capsys.readouterr().err


def test_table_without_predictors_or_with_text_values_is_rejected(tmp_path):
    path = _write(tmp_path / "nopred.csv", ["task", "seq_idx", "score", GAIN_COLUMN], [["a", 0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="no predictor column.*u_\\* or \\*_norm"):
        load_calibration(path)
    path = _write(tmp_path / "text.csv", ["task", "seq_idx", "u_r_norm", GAIN_COLUMN],
                  [["a", 0, 1.0, 2.0], ["a", 1, "high", 1.0]])
    with pytest.raises(ValueError, match="'u_r_norm' must be numeric but holds 'high'"):
        load_calibration(path)


def test_per_task_stats_break_down_each_task(tmp_path):
    rows = [("up", i, 1.0, float(i), float(i), float(i), 3.0 - i) for i in range(6)]  # rho -1, 2 of 6 < 0
    rows += [("flat", i, 1.0, float(i), float(i), float(i), 1.0 + i) for i in range(4)]  # rho +1, none < 0
    rows += [("cheetah-run", i, 1.0, 10.0 + i, 0.0, 0.0, 1.0) for i in range(3)]
    table = per_task_stats(load_calibration(_write(tmp_path / "t.csv", CALIBRATION_COLUMNS, rows)))
    assert list(table.index) == ["up", "flat", "cheetah-run"]
    assert table.loc["cheetah-run", "domain"] == "dmcontrol" and table.loc["up", "domain"] == ""
    assert table.loc["up", "u_r_norm_median"] == pytest.approx(2.5)
    assert table.loc["cheetah-run", "u_r_norm_median"] == pytest.approx(11.0)
    assert table.loc["up", "n"] == 6 and table.loc["up", "hallucination_rate"] == pytest.approx(2 / 6)
    assert table.loc["up", "median_gain_db"] == pytest.approx(0.5)
    assert table.loc["up", "u_r_norm_spearman"] == pytest.approx(-1.0)
    assert table.loc["up", "u_r_norm_auroc"] == pytest.approx(1.0)
    assert table.loc["flat", "u_f_norm_spearman"] == pytest.approx(1.0)
    assert math.isnan(table.loc["flat", "u_f_norm_auroc"])  # no hallucinating rows


# ---- combined predictor, tasks held out --------------------------------------------------------------------


def _synthetic(n_tasks=8, per_task=25, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n_tasks * per_task)
    u = np.exp(latent[:, None] + rng.normal(0, 0.6, (len(latent), 3)))
    return pd.DataFrame({"task": np.repeat([f"task{i}" for i in range(n_tasks)], per_task),
                         "seq_idx": np.tile(np.arange(per_task), n_tasks),
                         "u_a": u[:, 0], "u_b": u[:, 1], "u_c": u[:, 2],
                         GAIN_COLUMN: -3.0 * latent + rng.normal(0, 1.0, len(latent))})


def test_task_folds_never_train_on_a_scored_task():
    tasks = np.repeat([f"t{i}" for i in range(11)], [3, 5, 2, 8, 1, 4, 4, 6, 2, 7, 3])
    folds = task_folds(tasks, k=4, seed=1)
    assert len(folds) == 4
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(tasks)))  # every row scored exactly once
    for train, test in folds:
        assert set(tasks[train]).isdisjoint(tasks[test])
        assert set(tasks[train]) | set(tasks[test]) == set(tasks)
    assert sorted(len(set(tasks[test])) for _, test in folds) == [2, 3, 3, 3]
    with pytest.raises(ValueError, match="12 folds with 11 distinct tasks"):
        task_folds(tasks, k=12)


@pytest.mark.parametrize("combiner", ["rank_mean", "logistic"])
def test_held_out_scores_ignore_the_scored_tasks_own_data(combiner):
    df = _synthetic()
    base = held_out_scores(df, combiner, k=4, seed=0)
    _, test = task_folds(df["task"].to_numpy(), k=4, seed=0)[0]
    same, moved = test[0::2], test[1::2]
    changed = df.copy()
    changed.loc[test, GAIN_COLUMN] *= -1.0  # flip every outcome in the scored fold
    changed.loc[moved, ["u_a", "u_b", "u_c"]] *= 7.0  # and half of its predictor values
    after = held_out_scores(changed, combiner, k=4, seed=0)
    assert np.array_equal(after[same], base[same])
    outside = np.setdiff1d(np.arange(len(df)), test)
    assert not np.allclose(after[outside], base[outside])  # the same edit does move other folds' scores


def test_combined_predictor_beats_single_noisy_predictors_held_out():
    df = _synthetic(n_tasks=10, per_task=40, seed=3)
    single = calibration_stats(df)
    for combiner in ("rank_mean", "logistic"):
        c = combined_stats(df, combiner, k=5, seed=0)
        assert c.n == 400 and len(c.fold_auroc) == 5
        assert c.best_single_spearman == min(s.spearman for s in single.values())
        assert c.beats_best_single_spearman and c.beats_best_single_auroc  # three independent views of one signal


def test_combined_needs_two_predictors_and_known_combiner():
    df = _synthetic().drop(columns=["u_b", "u_c"])
    with pytest.raises(ValueError, match="two or more predictor columns"):
        combined_stats(df)
    with pytest.raises(ValueError, match="unknown combiner 'mean'"):
        held_out_scores(_synthetic(), "mean")


# ---- writing tables and figures ----------------------------------------------------------------------------


def test_predictor_agreement_is_the_spearman_between_predictors_by_hand(paper, tmp_path, capsys):
    """Pairwise rho by hand (ranks then Pearson) over rows where both are finite; the report prints it."""
    r = [0.3, 0.1, 0.2, float("nan"), 0.5]
    f = [1.0, 2.0, 2.0, 4.0, 3.0]
    s = [3.0, 5.0, 4.0, 1.0, 2.0]  # falls as r rises where r is finite
    rows = [("t", i, 1.0, r[i], f[i], s[i], 1.0 - i) for i in range(5)]
    path = _write(tmp_path / "a.csv", CALIBRATION_COLUMNS, rows)
    got = predictor_agreement(load_calibration(path))
    assert list(got) == [("u_r_norm", "u_f_norm"), ("u_r_norm", "u_s_norm"), ("u_f_norm", "u_s_norm")]
    keep = [0, 1, 2, 4]
    assert got[("u_r_norm", "u_f_norm")] == pytest.approx(
        _pearson(_ranks([r[i] for i in keep]), _ranks([f[i] for i in keep])))
    assert got[("u_f_norm", "u_s_norm")] == pytest.approx(_pearson(_ranks(f), _ranks(s)))
    assert got[("u_r_norm", "u_s_norm")] == pytest.approx(-1.0)
    # the paper's three agree with each other far more than with dPSNR: one signal, not three
    paper_agreement = predictor_agreement(paper)
    assert min(paper_agreement.values()) > 0.95
    assert main(["calibration-report"]) == 0
    assert f"u_f_norm~u_s_norm {paper_agreement[('u_f_norm', 'u_s_norm')]:.3f}" in capsys.readouterr().out


def test_write_calibration_csv_round_trips_with_the_paper_columns(tmp_path):
    rows = [dict(task="cup-catch", seq_idx=i, action_shuffle_ratio=1.0, u_r_norm=0.1 * i, u_f_norm=0.2,
                 u_s_norm=float("nan") if i == 2 else 0.3, rollout_psnr_gain_db=1.5 - i) for i in range(3)]
    path = write_calibration_csv(rows, tmp_path / "sub" / "model.csv")
    assert [p.name for p in path.parent.iterdir()] == ["model.csv"]  # no temporary file left behind
    back = load_calibration(path)
    assert list(back.columns) == list(CALIBRATION_COLUMNS)
    assert back["u_r_norm"].tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert math.isnan(back.loc[2, "u_s_norm"]) and back.loc[2, GAIN_COLUMN] == -0.5
    with pytest.raises(ValueError, match="row 0: missing \\['u_s_norm'\\]"):
        write_calibration_csv([{k: v for k, v in rows[0].items() if k != "u_s_norm"}], tmp_path / "x.csv")


def test_calibration_figure_has_a_log_x_panel_per_predictor_and_overlays(paper, tmp_path):
    fig = calibration_figure(paper)
    assert [fig.layout[f"xaxis{i}"].type for i in ("", "2", "3")] == ["log"] * 3
    assert len(fig.data) == 6 and "-0.808" in fig.layout.annotations[0].text
    assert any(shape.y0 == 0 and shape.line.dash == "dash" for shape in fig.layout.shapes)
    curve = fig.data[1]
    assert np.allclose(curve.y, calibration_stats(paper)["u_r_norm"].curve_gain)
    model = paper.assign(u_r_norm=paper["u_r_norm"] * 0.5).drop(columns=["u_s_norm"])
    with_overlay = calibration_figure(paper, overlay=model, names=("base", "finetuned"))
    assert len(with_overlay.data) == 6 + 4  # the overlay lacks u_s_norm
    assert {t.name for t in with_overlay.data} >= {"finetuned sequences", "finetuned decile median"}


def test_per_frame_trace_figure_marks_frames_over_threshold():
    t = np.arange(96)
    traces = {"u_r": 1.0 + t / 40, "u_f": np.full(96, 0.2), "u_s": np.where(t < 10, 0.9, 0.1)}
    fig = per_frame_trace_figure(traces)
    over = {tr.name: len(tr.x) for tr in fig.data if tr.name.endswith("≥ threshold")}
    assert over == {"u_r ≥ threshold": 56, "u_f ≥ threshold": 0, "u_s ≥ threshold": 10}
    assert sorted(shape.y0 for shape in fig.layout.shapes) == [0.5, 0.66, 2.0]
    with pytest.raises(ValueError, match="no threshold for \\['u_x'\\]"):
        per_frame_trace_figure({"u_x": [1.0]})
    with pytest.raises(ValueError, match="one length"):
        per_frame_trace_figure({"u_r": [1.0, 2.0], "u_f": [1.0]})


def test_cli_per_task_prints_one_csv_row_per_task(tmp_path, capsys):
    rows = [(f"t{i % 3}", i, 1.0, float(i), float(i), float(i), 4.0 - i) for i in range(9)]
    path = _write(tmp_path / "t.csv", CALIBRATION_COLUMNS, rows)
    assert main(["calibration-report", str(path), "--per-task", "--folds", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("task,domain,n,hallucination_rate")))
    assert [line.split(",")[0] for line in lines[start + 1:]] == ["t0", "t1", "t2"]


def test_cli_reports_a_table_of_few_tasks_or_one_outcome_without_the_combined_figures(tmp_path, capsys):
    """A held-out file of two tasks gets two folds; one where every rollout hallucinates gets no combiner."""
    two_tasks = [(f"t{i % 2}", i, 1.0, float(i), float(i % 3), float(9 - i), 4.0 - i) for i in range(10)]
    assert main(["calibration-report", str(_write(tmp_path / "a.csv", CALIBRATION_COLUMNS, two_tasks))]) == 0
    assert "(2 task-grouped folds, n=10)" in capsys.readouterr().out
    all_bad = [(f"t{i % 3}", i, 1.0, float(i), float(i % 3), float(9 - i), -1.0 - i) for i in range(9)]
    path = _write(tmp_path / "b.csv", CALIBRATION_COLUMNS, all_bad)
    assert main(["calibration-report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "combined predictors: not computed" in out and "u_r_norm" in out
    assert main(["calibration-report", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"u_r_norm", "u_f_norm", "u_s_norm"} and report["u_r_norm"]["auroc"] is None
    assert report["u_r_norm"]["spearman"] == pytest.approx(-1.0)


def test_the_report_compares_with_the_paper_table_cut_to_the_same_dpsnr_range(paper, tmp_path, capsys):
    from mmbench2_lab.calibration import gain_range, in_gain_range
    rows = [(f"t{i % 4}", i, 1.0, float(i), float(i % 5), float(40 - i), -2.0 + 0.1 * i) for i in range(41)]
    path = _write(tmp_path / "narrow.csv", CALIBRATION_COLUMNS, rows)
    lo, hi = gain_range(load_calibration(path))
    assert (lo, hi) == pytest.approx((-2.0 + 0.1 * 2, -2.0 + 0.1 * 38))  # 5th and 95th percentile of 41 values
    cut = in_gain_range(paper, lo, hi)
    gain = paper[GAIN_COLUMN]
    assert len(cut) == int(((gain >= lo) & (gain <= hi)).sum()) and 0 < len(cut) < len(paper)
    rho = calibration_stats(cut)["u_r_norm"].spearman
    assert -0.7 < rho < -0.2, "a narrow range leaves the paper's u_r much less to rank than its -0.808"
    assert main(["calibration-report", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"dPSNR range ({lo:+.2f} to {hi:+.2f} dB" in out and f"u_r_norm rho {rho:.3f}" in out
    assert main(["calibration-report"]) == 0  # the paper's own table is not compared with itself
    assert "within this table's dPSNR range" not in capsys.readouterr().out
