"""Paired comparison of two methods (``spotlighter.results.compare``, ``python -m spotlighter.results compare``)."""

import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spotlighter.results import cli
from spotlighter.results.compare import (
    A_WINS,
    B_WINS,
    NO_DECISION,
    CompareError,
    bootstrap_intervals,
    compare,
    compare_all,
    regularized_beta,
    render,
    t_cdf,
    t_interval,
    t_quantile,
)
from spotlighter.results.constants import DG_TARGETS_BY_SOURCE, XD_SOURCE, XD_TARGETS_BY_SOURCE
from spotlighter.results.layout import seed_dir_path
from spotlighter.results.synthetic import eval_log, train_log, write_log

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTAL = 1000  # test images per evaluation: accuracy = correct / 10
A_CFG, B_CFG = "cfg_a", "cfg_b"


def write_b2n(root, trainer, config, runs, shots=16):
    """runs: {(dataset, seed): (base_correct, new_correct)}, either may be None (no folder)."""
    for (dataset, seed), (base, new) in runs.items():
        for role, correct in (("base", base), ("new", new)):
            if correct is not None:
                write_log(seed_dir_path(root, "base2new", trainer, config, dataset, role, shots, seed),
                          eval_log(correct, TOTAL, trainer=trainer, dataset=dataset))


def write_transfer(root, protocol, trainer, config, runs, source=XD_SOURCE):
    """runs: {(target, seed): correct}; the source run of every seed gets 500 correct."""
    for (target, seed), correct in runs.items():
        write_log(seed_dir_path(root, protocol, trainer, config, source, "source", 16, seed, source),
                  eval_log(500, TOTAL, trainer=trainer, dataset=source))
        write_log(seed_dir_path(root, protocol, trainer, config, target, "target", 16, seed, source),
                  eval_log(correct, TOTAL, trainer=trainer, dataset=target))


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- the t distribution
@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (8, 2.3060), (10, 2.2281),
                                          (14, 2.1448), (30, 2.0423), (32, 2.0369), (120, 1.9799)])
def test_t_quantile_matches_printed_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_closed_forms_and_symmetry():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
        assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)
    assert t_quantile(0.5, 5) == 0.0
    assert t_quantile(0.995, 9) == pytest.approx(3.2498, abs=1e-4)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.95997, abs=1e-4)  # tends to the normal quantile
    for df in (1, 3, 17):
        for t in (-3.0, -0.5, 0.7, 4.0):
            assert t_quantile(t_cdf(t, df), df) == pytest.approx(t, rel=1e-9)


def test_regularized_beta_closed_forms():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert regularized_beta(x, 1, 1) == pytest.approx(x, abs=1e-14)
        assert regularized_beta(x, 3, 1) == pytest.approx(x ** 3, abs=1e-14)
        assert regularized_beta(x, 1, 4) == pytest.approx(1 - (1 - x) ** 4, abs=1e-14)


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (0.975, 0)])
def test_t_quantile_rejects_bad_arguments(p, df):
    with pytest.raises(ValueError):
        t_quantile(p, df)


def test_t_interval_by_hand_and_below_two_pairs():
    interval = t_interval("Base", [1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.302653
    assert (interval.n, interval.mean, interval.sd) == (3, 2.0, 1.0)
    assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert interval.decision == NO_DECISION  # the interval reaches below 0
    assert t_interval("Base", [1.0, 2.0, 3.0], confidence=0.5).decision == A_WINS  # t(0.75, 2) = 0.8165
    one = t_interval("HM", [5.0])
    assert (one.mean, one.low, one.half_width, one.decision) == (5.0, None, None, NO_DECISION)


def test_bootstrap_is_seeded_and_uses_interpolated_percentiles():
    diffs = [0.4, -1.0, 2.5, 1.1, 0.3, 3.0, -0.2]
    first = bootstrap_intervals(["HM"], [diffs], resamples=2000, seed=7)[0]
    assert bootstrap_intervals(["HM"], [diffs], resamples=2000, seed=7)[0] == first
    assert bootstrap_intervals(["HM"], [diffs], resamples=2000, seed=8)[0] != first
    assert first.low < first.mean < first.high and first.mean == pytest.approx(statistics.fmean(diffs))
    # the same draws by hand, and numpy's (linear) percentiles of their means
    import random

    rng = random.Random(7)
    means = []
    for _ in range(2000):
        draw = [rng.randrange(len(diffs)) for _ in diffs]
        means.append(math.fsum(diffs[i] for i in draw) / len(diffs))
    assert first.low == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert first.high == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    constant = bootstrap_intervals(["Base"], [[1.5] * 4], resamples=100)[0]
    assert (constant.low, constant.high, constant.decision) == (pytest.approx(1.5), pytest.approx(1.5), A_WINS)


# ----------------------------------------------------------------------------- base-to-novel trees
def test_hand_computed_interval_with_per_pair_hm(tmp_path):
    root = tmp_path / "out"
    write_b2n(root, "CoOp", B_CFG, {("d1", 1): (700, 600), ("d1", 2): (700, 600), ("d2", 1): (700, 600)})
    write_b2n(root, "Spotlighter", A_CFG, {("d1", 1): (710, 600), ("d1", 2): (720, 620), ("d2", 1): (730, 570)})
    c = compare(root, "base2new", "spotlighter", "coop")
    assert [(p.dataset, p.seed) for p in c.pairs] == [("d1", 1), ("d1", 2), ("d2", 1)]
    t2 = 4.302653
    base, new, hm = c.intervals
    assert (base.mean, base.sd) == pytest.approx((2.0, 1.0))
    assert (base.low, base.high) == pytest.approx((2 - t2 / math.sqrt(3), 2 + t2 / math.sqrt(3)), abs=1e-5)
    new_sd = math.sqrt(((0 + 1 / 3) ** 2 + (2 + 1 / 3) ** 2 + (-3 + 1 / 3) ** 2) / 2)
    assert (new.mean, new.sd) == pytest.approx((-1 / 3, new_sd))
    assert new.half_width == pytest.approx(t2 * new_sd / math.sqrt(3), abs=1e-5)
    hm_b = 2 * 70 * 60 / 130
    hm_diffs = [2 * 71 * 60 / 131 - hm_b, 2 * 72 * 62 / 134 - hm_b, 2 * 73 * 57 / 130 - hm_b]
    assert [p.diff[2] for p in c.pairs] == pytest.approx(hm_diffs, abs=1e-12)
    assert hm.mean == pytest.approx(statistics.fmean(hm_diffs), abs=1e-12)
    assert hm.half_width == pytest.approx(t2 * statistics.stdev(hm_diffs) / math.sqrt(3), abs=1e-5)
    # the per-pair HM is not the HM of the mean Base and New
    assert hm.mean != pytest.approx(2 * 72 * (179 / 3) / (72 + 179 / 3) - hm_b, abs=1e-3)
    assert [i.decision for i in c.intervals] == [NO_DECISION] * 3
    assert c.missing == []


@pytest.fixture
def clear_win(tmp_path):
    """Spotlighter 3 points above CoOp on Base and New (± 0.1-0.3), two datasets, three seeds."""
    root = tmp_path / "out"
    noise = {1: 1, 2: -2, 3: 3}
    coop, spot = {}, {}
    for dataset in ("d1", "d2"):
        for seed in (1, 2, 3):
            coop[(dataset, seed)] = (700 + seed, 600 - seed)
            spot[(dataset, seed)] = (730 + seed + noise[seed], 630 - seed - noise[seed])
    write_b2n(root, "CoOp", B_CFG, coop)
    write_b2n(root, "Spotlighter", A_CFG, spot)
    return root


def test_clear_win_is_decided_both_ways(clear_win):
    c = compare(clear_win, "base2new", "spotlighter", "coop")
    assert len(c.pairs) == 6 and [i.n for i in c.intervals] == [6, 6, 6]
    assert [i.decision for i in c.intervals] == [A_WINS] * 3
    assert c.interval("Base").mean == pytest.approx(3.0 + (1 - 2 + 3) / 30)
    assert all(i.low > 2 and i.high < 4 for i in c.intervals)
    reverse = compare(clear_win, "base2new", "coop", "spotlighter")
    assert [i.decision for i in reverse.intervals] == [B_WINS] * 3
    assert reverse.interval("HM").mean == pytest.approx(-c.interval("HM").mean)
    boot = compare(clear_win, "base2new", "spotlighter", "coop", interval="bootstrap", resamples=500)
    assert [i.decision for i in boot.intervals] == [A_WINS] * 3
    assert boot.interval("HM").mean == pytest.approx(c.interval("HM").mean)


def test_noisy_tie_is_not_decided(tmp_path):
    root = tmp_path / "out"
    swings = {("d1", 1): 40, ("d1", 2): -40, ("d1", 3): 30, ("d2", 1): -30, ("d2", 2): 50, ("d2", 3): -50}
    write_b2n(root, "CoOp", B_CFG, {k: (700, 600) for k in swings})
    write_b2n(root, "MaPLe", A_CFG, {k: (700 + s, 600 + s) for k, s in swings.items()})
    c = compare(root, "base2new", "maple", "coop")
    base, new, hm = c.intervals
    assert base.mean == pytest.approx(0.0, abs=1e-12) and new.mean == pytest.approx(0.0, abs=1e-12)
    assert base.low < 0 < base.high and hm.low < 0 < hm.high
    assert [i.decision for i in c.intervals] == [NO_DECISION] * 3
    assert base.half_width == pytest.approx(t_quantile(0.975, 5) * statistics.stdev(
        [4.0, -4.0, 3.0, -3.0, 5.0, -5.0]) / math.sqrt(6))


def test_missing_pairs_are_listed_and_left_out(tmp_path, capsys):
    root = tmp_path / "out"
    write_b2n(root, "CoOp", B_CFG, {("d1", 1): (700, 600), ("d1", 2): (700, None), ("d1", 3): (700, 600)})
    write_b2n(root, "Spotlighter", A_CFG, {("d1", 1): (710, 610), ("d1", 2): (720, 620), ("d1", 4): (730, 630)})
    # seed 3 of A: a training that never finished
    write_log(seed_dir_path(root, "base2new", "Spotlighter", A_CFG, "d1", "base", 16, 3),
              train_log(700, TOTAL, trainer="Spotlighter", dataset="d1", finished=False))
    write_b2n(root, "Spotlighter", A_CFG, {("d1", 3): (None, 600)})
    c = compare(root, "base2new", "spotlighter", "coop")
    assert [(p.dataset, p.seed) for p in c.pairs] == [("d1", 1)]
    assert [(m.dataset, m.seed, m.side) for m in c.missing] == [("d1", 2, "B"), ("d1", 3, "A"), ("d1", 4, "B")]
    assert c.missing[0].what == "new: no run folder"
    assert c.missing[1].what.startswith("base: no result (unfinished training log (no 'Finish training' line)")
    assert c.missing[2].what == "no run folder"
    assert c.intervals[0].low is None  # one pair: no interval
    code, out, err = run_cli(["compare", "base2new", "--root", str(root), "--a", "spotlighter", "--b", "coop"], capsys)
    assert code == 0, err
    assert "| Base | 1 | +1.00 | — | — | — | no decision (needs ≥ 2 pairs) |" in out
    assert "Left out: 3 (dataset, seed) pairs missing on one side:" in out
    assert f"- d1 seed 2: B (CoOp/{B_CFG}) new: no run folder" in out
    assert f"- d1 seed 4: B (CoOp/{B_CFG}) no run folder" in out


# ----------------------------------------------------------------------------- command line
def test_cli_prints_pairs_interval_half_width_and_decision(clear_win, capsys):
    code, out, err = run_cli(["compare", "base2new", "--root", str(clear_win), "--a", "spotlighter",
                              "--b", "CoOp"], capsys)
    assert code == 0 and err == ""
    c = compare(clear_win, "base2new", "spotlighter", "coop")
    hm = c.interval("HM")
    assert out.startswith("## Spotlighter vs CoOp: paired comparison, Base-to-novel generalisation (16 shots)\n")
    assert f"A = Spotlighter/{A_CFG} · B = CoOp/{B_CFG}" in out
    assert "6 (dataset, seed) pairs on 2 datasets (d1 seeds 1, 2, 3; d2 seeds 1, 2, 3)" in out
    assert "95 % paired t interval over the pairs: mean ± t(0.975, n − 1) = 2.571 · sd / √n" in out
    assert (f"| HM | 6 | {hm.mean:+.2f} | {hm.sd:.2f} | [{hm.low:+.2f}, {hm.high:+.2f}] | {hm.half_width:.2f} "
            "| A > B |") in out
    assert "Left out" not in out and "## Summary" not in out


def test_cli_all_against_one_baseline(clear_win, capsys):
    write_b2n(clear_win, "ZeroshotCLIP", "zs", {(d, s): (650, 650) for d in ("d1", "d2") for s in (1, 2, 3)})
    code, out, _ = run_cli(["compare", "base2new", "--root", str(clear_win), "--b", "coop"], capsys)
    assert code == 0
    assert out.count("paired comparison, Base-to-novel") == 2
    assert "## Summary: HM difference A − B" in out
    assert f"| ZeroshotCLIP/zs | CoOp/{B_CFG} | 6 |" in out
    assert f"| Spotlighter/{A_CFG} | CoOp/{B_CFG} | 6 |" in out and "| Spotlighter > CoOp |" in out
    # the same through the function the demo calls
    assert [c.a.trainer for c in compare_all(clear_win, "base2new", "coop")] == ["ZeroshotCLIP", "Spotlighter"]


def test_cli_bootstrap_says_so(clear_win, capsys):
    code, out, _ = run_cli(["compare", "base2new", "--root", str(clear_win), "--a", "spotlighter", "--b", "coop",
                            "--interval", "bootstrap", "--resamples", "300", "--bootstrap-seed", "3"], capsys)
    assert code == 0
    assert "95 % percentile bootstrap over the pairs (300 resamples, seed 3); half-width = (high − low) / 2" in out


@pytest.mark.parametrize("argv, message", [
    (["--a", "nosuch", "--b", "coop"],
     f"spotlighter-results: A 'nosuch': no base2new runs of trainer 'nosuch' under {{root}}; found: "
     f"CoOp ({B_CFG}); Spotlighter ({A_CFG}, other)\n"),
    (["--a", "spotlighter", "--b", "coop"],
     f"spotlighter-results: A 'spotlighter': Spotlighter has several configs under {{root}} ({A_CFG}, other); "
     f"name one, e.g. Spotlighter:{A_CFG}\n"),
    (["--a", "spotlighter:nope", "--b", "coop"],
     "spotlighter-results: A 'spotlighter:nope': no base2new runs of Spotlighter with config 'nope' under "
     f"{{root}}; its configs: {A_CFG}, other\n"),
    (["--a", f"coop:{B_CFG}", "--b", "coop"],
     f"spotlighter-results: A and B are the same method (CoOp/{B_CFG}); compare two different ones\n"),
    (["--a", "spotlighter:other", "--b", "coop"],
     f"spotlighter-results: no (dataset, seed) pair has results of both A Spotlighter/other and B CoOp/{B_CFG} "
     "(16 shots); A has: d9 seeds 5; B has: d1 seeds 1, 2, 3; d2 seeds 1, 2, 3\n"),
])
def test_bad_input_is_one_line_and_exit_2(clear_win, capsys, argv, message):
    write_b2n(clear_win, "Spotlighter", "other", {("d9", 5): (700, 600)})
    code, out, err = run_cli(["compare", "base2new", "--root", str(clear_win), *argv], capsys)
    assert (code, out) == (2, "")
    assert err == message.format(root=clear_win)


def test_no_runs_at_all_exits_1(tmp_path, capsys):
    code, out, err = run_cli(["compare", "base2new", "--root", str(tmp_path / "empty"), "--b", "coop"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"spotlighter-results: no base2new runs under {tmp_path / 'empty'} (searched ")
    assert err.count("\n") == 1


def test_several_shot_counts_need_shots(clear_win, capsys):
    write_b2n(clear_win, "CoOp", B_CFG, {("d1", 1): (700, 600)}, shots=4)
    write_b2n(clear_win, "Spotlighter", A_CFG, {("d1", 1): (720, 600)}, shots=4)
    code, _, err = run_cli(["compare", "base2new", "--root", str(clear_win), "--a", "spotlighter", "--b", "coop"],
                           capsys)
    assert code == 2
    assert err == "spotlighter-results: A and B both have runs with 4, 16 shots; pick one with --shots " \
                  "(shots= in compare())\n"
    c = compare(clear_win, "base2new", "spotlighter", "coop", shots=4)
    assert (c.shots, len(c.pairs), c.intervals[0].mean) == (4, 1, pytest.approx(2.0))


def test_module_entry_point_without_torch(clear_win):
    code = ("import sys, runpy; sys.argv = ['x', 'compare', 'base2new', '--root', sys.argv[1], '--a', "
            "'spotlighter', '--b', 'coop']\n"
            "try:\n    runpy.run_module('spotlighter.results', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "assert 'torch' not in sys.modules and 'dassl' not in sys.modules and 'scipy' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code, str(clear_win)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| HM | 6 |" in proc.stdout and "| A > B |" in proc.stdout


# ----------------------------------------------------------------------------- cross-dataset and DG
def test_transfer_compares_target_accuracy_and_ignores_the_source(tmp_path, capsys):
    root = tmp_path / "out"
    write_transfer(root, "xd", "CoOp", "cfg", {("caltech101", s): 900 for s in (1, 2, 3)}
                   | {("dtd", s): 400 for s in (1, 2)})
    write_transfer(root, "xd", "MaPLe", "cfg", {("caltech101", s): 910 + s for s in (1, 2, 3)}
                   | {("dtd", s): 420 + s for s in (1, 2, 3)})
    c = compare(root, "xd", "maple", "coop")
    assert c.metrics == ("Accuracy",)
    assert [(p.dataset, p.seed) for p in c.pairs] == [("caltech101", 1), ("caltech101", 2), ("caltech101", 3),
                                                      ("dtd", 1), ("dtd", 2)]
    diffs = [1.1, 1.2, 1.3, 2.1, 2.2]
    assert c.main.mean == pytest.approx(statistics.fmean(diffs))
    assert c.main.half_width == pytest.approx(t_quantile(0.975, 4) * statistics.stdev(diffs) / math.sqrt(5))
    assert c.main.decision == A_WINS
    assert [(m.dataset, m.seed, m.side, m.what) for m in c.missing] == [("dtd", 3, "B", "no run folder")]
    code, out, _ = run_cli(["compare", "xd", "--root", str(root), "--a", "maple", "--b", "coop"], capsys)
    assert code == 0 and "5 (target, seed) pairs on 2 targets" in out and "| Accuracy | 5 |" in out

    dg_target = DG_TARGETS_BY_SOURCE[XD_SOURCE][0]
    write_transfer(root, "dg", "CoOp", "cfg", {(dg_target, s): 600 + s for s in (1, 2, 3)})
    write_transfer(root, "dg", "MaPLe", "cfg", {(dg_target, 1): 591, (dg_target, 2): 593, (dg_target, 3): 592})
    dg = compare(root, "dg", "maple", "coop")
    assert [p.dataset for p in dg.pairs] == [dg_target] * 3
    assert dg.main.mean == pytest.approx(-1.0) and dg.main.decision == B_WINS


def test_render_summary_only_for_several_and_baseline_alone_is_an_error(clear_win, tmp_path):
    one = render(compare_all(clear_win, "base2new", "coop", ["spotlighter"]))
    assert "## Summary" not in one and one.count("paired comparison") == 1
    alone = tmp_path / "alone"
    write_b2n(alone, "CoOp", B_CFG, {("d1", 1): (700, 600)})
    with pytest.raises(CompareError, match=f"only B CoOp/{B_CFG} has base2new runs under"):
        compare_all(alone, "base2new", "coop")


def test_transfer_from_another_source_is_found_by_its_targets(tmp_path, capsys):
    source = "minibench"
    target = XD_TARGETS_BY_SOURCE[source][0]
    root = tmp_path / "out"
    write_transfer(root, "xd", "CoOp", "cfg", {(target, s): 500 + s for s in (1, 2, 3)}, source=source)
    write_transfer(root, "xd", "MaPLe", "cfg", {(target, s): 530 + 2 * s for s in (1, 2, 3)}, source=source)
    with pytest.raises(CompareError, match="no xd runs under"):
        compare(root, "xd", "maple", "coop")  # looked for ImageNet's folders
    c = compare(root, "xd", "maple", "coop", source=source)
    assert [p.diff[0] for p in c.pairs] == pytest.approx([3.1, 3.2, 3.3]) and c.main.decision == A_WINS
    code, out, err = run_cli(["compare", "xd", "--root", str(root), "--datasets", target, "--a", "maple",
                              "--b", "coop"], capsys)
    assert code == 0, err
    assert f"Cross-dataset transfer (16 shots, source {source})" in out and "| Accuracy | 3 | +3.20 |" in out
