"""`maxdrop report` on run folders laid out as the grid runner and LightningCLI write them."""

import csv

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from scipy import stats

from maxdrop.experiments.report import ReportError, find_runs, main, report
from maxdrop.experiments.report_plots import colours
from maxdrop.experiments.report_stats import Comparison, compare, holm


def make_run(
    root,
    config_name,
    seed,
    test_error,
    slots=None,
    cutout=0,
    finished=True,
    active_error=None,
    val=None,
    train_acc=None,
    ece=None,
    nll=None,
):
    config = {
        "seed_everything": seed,
        "model": {
            "class_path": "maxdrop.module.ClassificationModule",
            "init_args": {"backbone": {"class_path": "maxdrop.models.SimpleCNN", "init_args": {"slots": slots}}},
        },
        "data": {"class_path": "maxdrop.data.CIFARDataModule", "init_args": {"data_dir": f"/d{seed}", "augment": {}}},
        "trainer": {"max_epochs": 3},
    }
    if cutout:
        config["data"]["init_args"]["augment"] = {"cutout_length": cutout}
    logger = TensorBoardLogger(str(root), name=config_name, version=f"seed_{seed}")
    for epoch, v in enumerate(val or [50.0 - 5 * seed, 40.0, 30.0]):
        logger.log_metrics({"val/error": v, "epoch": epoch}, step=epoch * 10)
        if slots:
            logger.log_metrics({"maxdrop/stage1/dropped_fraction": 0.1 + 0.01 * epoch, "epoch": epoch}, step=epoch * 10)
    if train_acc is not None:
        logger.log_metrics({"train/acc": train_acc, "epoch": 2}, step=29)
    logger.finalize("success")
    run_dir = root / config_name / f"seed_{seed}"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        test = TensorBoardLogger(str(root), name=config_name, version=f"seed_{seed}", sub_dir="test")
        extra = {k: v for k, v in (("test/ece", ece), ("test/nll", nll)) if v is not None}
        test.log_metrics({"test/error": test_error, **extra}, step=30)
        test.finalize("success")
    if active_error is not None:
        act = TensorBoardLogger(str(root), name=config_name, version=f"seed_{seed}", sub_dir="test_active_in_eval")
        act.log_metrics({"test/error": active_error}, step=30)
        act.finalize("success")
    return run_dir


MAXDROP = {"stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}}}


def test_table_groups_seeds_by_config_and_tests_against_the_baseline(tmp_path):
    for seed, (b, m) in enumerate([(30.0, 28.0), (31.0, 28.5), (32.0, 29.0)]):
        make_run(tmp_path, "baseline", seed, b)
        make_run(tmp_path, "maxdropout", seed, m, slots=MAXDROP, active_error=m + 1)
    make_run(tmp_path, "maxdropout", 9, 99.0, slots=MAXDROP, finished=False)
    out = tmp_path / "report"
    text = report([tmp_path], out, baseline="baseline")
    rows = {r["config"]: r for r in csv.DictReader((out / "report.csv").read_text().splitlines())}
    assert set(rows) == {"baseline", "maxdropout"}
    assert rows["baseline"]["seeds"] == "3" and rows["maxdropout"]["seeds"] == "3"  # the unfinished run is not in
    assert rows["baseline"]["test error % (mean ± std)"] == "31.00 ± 1.00"
    assert rows["maxdropout"]["min"] == "28.00" and rows["maxdropout"]["max"] == "29.00"
    assert rows["maxdropout"]["test error %, MaxDropout on in eval"] == "29.50"
    assert rows["maxdropout"]["dropped fraction, last epoch"] == "stage1 0.12"
    p = float(rows["maxdropout"]["p vs baseline (Welch t-test), uncorrected"])
    assert 0 < p < 0.05
    assert rows["maxdropout"]["Δ test error vs baseline, points [95 % CI]"].startswith("-2.50 [")
    assert rows["baseline"]["Δ test error vs baseline, points [95 % CI]"] == "baseline"
    assert "Unfinished runs" in text and "seed_9" in text
    for png in ("val_error.png", "dropped_fraction.png", "measures.png"):
        assert (out / png).stat().st_size > 0 and f"({png})" in text


def test_paired_test_by_seed(tmp_path):
    for seed, (b, m) in enumerate([(30.0, 29.0), (35.0, 34.1), (40.0, 38.9)]):
        make_run(tmp_path, "baseline", seed, b)
        make_run(tmp_path, "maxdropout", seed, m, slots=MAXDROP)
    report([tmp_path], tmp_path / "r", baseline="baseline", test="paired")
    row = list(csv.DictReader((tmp_path / "r" / "report.csv").read_text().splitlines()))[1]
    # Welch would see no difference in such spread-out seeds; the paired test does.
    assert float(row["p vs baseline (paired t-test by seed), uncorrected"]) < 0.01


def test_best_val_error_is_the_minimum_over_epochs(tmp_path):
    make_run(tmp_path, "a", 0, 10.0, val=[40.0, 20.0, 25.0])
    report([tmp_path], tmp_path / "r")
    row = list(csv.DictReader((tmp_path / "r" / "report.csv").read_text().splitlines()))[0]
    assert row["best val error %"] == "20.00"


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ReportError, match="no runs found under"):
        find_runs([tmp_path])
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_only_unfinished_runs_is_a_clear_error(tmp_path):
    make_run(tmp_path, "a", 0, 10.0, finished=False)
    with pytest.raises(ReportError, match="none of the 1 runs found has a test result"):
        report([tmp_path], tmp_path / "r")


def test_configs_differing_in_more_than_the_compared_key(tmp_path):
    make_run(tmp_path, "baseline", 0, 10.0)
    run = make_run(tmp_path, "other", 0, 9.0, slots=MAXDROP)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["trainer"]["max_epochs"] = 7
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ReportError, match=r"differs from the baseline 'baseline' .*also in trainer.max_epochs"):
        report([tmp_path], tmp_path / "r", baseline="baseline")
    report([tmp_path], tmp_path / "r", baseline="baseline", allow_differences=True)


def test_unknown_baseline(tmp_path):
    make_run(tmp_path, "a", 0, 10.0)
    with pytest.raises(ReportError, match=r"baseline 'nope' is not one of the configs found: a"):
        report([tmp_path], tmp_path / "r", baseline="nope")


def test_seeds_of_one_config_must_not_differ_and_new_default_keys_do_not_count(tmp_path):
    make_run(tmp_path, "baseline", 0, 10.0)
    newer = make_run(tmp_path, "baseline", 1, 11.0)
    cfg = yaml.safe_load((newer / "config.yaml").read_text())
    cfg["model"]["init_args"]["channels_last"] = False  # an argument a newer maxdrop saves at its default
    (newer / "config.yaml").write_text(yaml.safe_dump(cfg))
    report([tmp_path], tmp_path / "r")
    assert list(csv.DictReader((tmp_path / "r" / "report.csv").read_text().splitlines()))[0]["seeds"] == "2"

    cfg["trainer"]["max_epochs"] = 9  # a real difference between two seeds of one row
    (newer / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ReportError, match=r"the runs of config 'baseline' differ among themselves in trainer.max_epochs"
    ):
        report([tmp_path], tmp_path / "r")


def test_paired_differences_have_a_t_interval_and_holm_corrects_over_all_rows(tmp_path):
    base = [30.0, 35.0, 40.0, 32.0, 38.0]
    deltas = {"a": [-1.0, -0.8, -1.2, -0.9, -1.1], "b": [0.5, -0.4, 0.2, 0.1, -0.3], "c": [2.0, 2.4, 1.6, 2.2, 1.8]}
    for seed, b in enumerate(base):
        make_run(tmp_path, "baseline", seed, b)
        for name, d in deltas.items():
            make_run(tmp_path, name, seed, b + d[seed], slots=MAXDROP)
    text = report([tmp_path], tmp_path / "r", baseline="baseline", test="paired")
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "r" / "report.csv").read_text().splitlines())}
    raw = {n: stats.ttest_rel([b + x for b, x in zip(base, d, strict=True)], base) for n, d in deltas.items()}
    ci = raw["a"].confidence_interval(0.95)
    assert rows["a"]["Δ test error vs baseline, points [95 % CI]"] == f"-1.00 [{ci.low:+.2f}, {ci.high:+.2f}]"
    # Holm by hand: the smallest p times 3, the next times 2 (kept monotone), the largest times 1.
    order = sorted(deltas, key=lambda n: raw[n].pvalue)
    expected, running = {}, 0.0
    for k, n in enumerate(order):
        running = max(running, min(1.0, (3 - k) * raw[n].pvalue))
        expected[n] = running
    for n in deltas:
        assert float(rows[n]["p vs baseline (paired t-test by seed), uncorrected"]) == pytest.approx(
            raw[n].pvalue,
            rel=0.05,  # printed with 2 significant digits
        )
        assert float(rows[n]["p vs baseline, Holm–Bonferroni over 3 rows"]) == pytest.approx(expected[n], rel=0.05)
    assert "Holm–Bonferroni" in text and "fewer errors" in text


def test_holm_keeps_the_order_of_p_values_and_skips_missing_ones():
    cs = [Comparison(3, 1.0, 0.0, 2.0, p) for p in (0.04, 0.01, 0.03)]
    adjusted = holm([cs[0], None, cs[1], cs[2]])
    assert adjusted[1] is None
    assert [c.p_holm for c in (adjusted[2], adjusted[3], adjusted[0])] == pytest.approx([0.03, 0.06, 0.06])


def test_paired_comparison_uses_common_seeds_only():
    c = compare({0: 10.0, 1: 12.0, 2: 11.0}, {1: 13.0, 2: 11.5, 7: 0.0}, "paired")
    assert c.n == 2 and c.diff == pytest.approx(0.75)
    assert compare({0: 10.0, 1: 12.0}, {1: 13.0, 5: 1.0}, "paired") is None  # one common seed: no test


def test_seeds_that_agree_up_to_rounding_give_a_degenerate_comparison_not_a_warning():
    # Two rows with the same error on every seed up to float rounding (as tiny runs produce): the
    # differences are rounding noise, not a variance (scipy would warn of catastrophic cancellation).
    ref = {s: 90.1 for s in range(3)}
    same = {s: 90.1 + (1e-14 if s == 1 else 0.0) for s in range(3)}
    for test in ("paired", "welch"):
        c = compare(ref, same, test)
        assert c.low == c.high == pytest.approx(0.0, abs=1e-12) and c.p == 1.0
    shifted = compare(ref, {s: 80.1 for s in range(3)}, "paired")
    assert shifted.diff == pytest.approx(-10.0) and shifted.p == 0.0
    # One side constant, the other not: a valid Welch test, silently.
    c = compare(ref, {0: 80.0, 1: 81.0, 2: 82.0}, "welch")
    assert c.diff == pytest.approx(-9.1) and 0 < c.p < 0.01


def test_versus_adds_a_reference_per_row_with_its_own_holm_family(tmp_path):
    dropout = {"stage1": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.1}}}
    for seed in range(3):
        make_run(tmp_path, "no_dropout", seed, 30.0 + seed)
        make_run(tmp_path, "dropout_p01", seed, 29.0 + seed + 0.1 * seed, slots=dropout)
        make_run(tmp_path, "topk_p01", seed, 28.0 + seed - 0.2 * seed, slots=MAXDROP)
    report([tmp_path], tmp_path / "r", baseline="no_dropout", test="paired", versus=["topk_*=dropout_p01"])
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "r" / "report.csv").read_text().splitlines())}
    assert rows["topk_p01"]["reference"] == "dropout_p01" and rows["dropout_p01"]["reference"] == "-"
    assert rows["topk_p01"]["Δ test error vs reference, points [95 % CI]"].startswith("-1.30 [")
    assert "p vs reference, Holm–Bonferroni over 1 rows" in rows["topk_p01"]
    with pytest.raises(ReportError, match=r"reference 'dropout_p03' of --versus 'topk_\*=dropout_p03' is not one"):
        report([tmp_path], tmp_path / "r", versus=["topk_*=dropout_p03"])
    with pytest.raises(ReportError, match=r"--versus takes ROW=REFERENCE"):
        report([tmp_path], tmp_path / "r", versus=["topk_p01"])
    assert main([str(tmp_path), "--out", str(tmp_path / "r"), "--versus", "nothing*=no_dropout"]) == 2


def test_calibration_nll_and_train_test_gap_columns(tmp_path):
    for seed in range(2):
        make_run(tmp_path, "a", seed, 40.0 + seed, train_acc=0.99, ece=0.10 + 0.02 * seed, nll=1.5)
    make_run(tmp_path, "b", 0, 30.0)  # a run from before these were logged
    out = tmp_path / "r"
    report([tmp_path], out)
    rows = {r["config"]: r for r in csv.DictReader((out / "report.csv").read_text().splitlines())}
    a = rows["a"]
    assert (a["test ECE %"], a["test NLL"], a["train acc % (last epoch)"]) == ("11.00", "1.500", "99.00")
    assert a["train–test gap (points)"] == "39.50"  # 99 - (100 - 40.5)
    assert (rows["b"]["test ECE %"], rows["b"]["train–test gap (points)"]) == ("-", "-")


def test_colours_are_fixed_by_the_sorted_config_names():
    few = colours(["b", "a", "c"])
    assert few == colours(["c", "b", "a"]) and len(set(few.values())) == 3
    many = colours([f"row{i:02d}" for i in range(25)])
    assert len(set(many.values())) == 25
