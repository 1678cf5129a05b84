"""`maxdrop report` on run folders laid out as the grid runner and LightningCLI write them."""

import csv

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from maxdrop.report import ReportError, find_runs, main, report


def make_run(root, config_name, seed, test_error, slots=None, cutout=0, finished=True, active_error=None, val=None):
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
    logger.finalize("success")
    run_dir = root / config_name / f"seed_{seed}"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        test = TensorBoardLogger(str(root), name=config_name, version=f"seed_{seed}", sub_dir="test")
        test.log_metrics({"test/error": test_error}, step=30)
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
    rows = {r["config"]: r for r in csv.DictReader(open(out / "report.csv"))}
    assert set(rows) == {"baseline", "maxdropout"}
    assert rows["baseline"]["seeds"] == "3" and rows["maxdropout"]["seeds"] == "3"  # the unfinished run is not in
    assert rows["baseline"]["test error % (mean ± std)"] == "31.00 ± 1.00"
    assert rows["maxdropout"]["min"] == "28.00" and rows["maxdropout"]["max"] == "29.00"
    assert rows["maxdropout"]["test error %, MaxDropout on in eval"] == "29.50"
    assert rows["maxdropout"]["dropped fraction, last epoch"] == "stage1 0.12"
    p = float(rows["maxdropout"]["p vs baseline (Welch t-test)"])
    assert 0 < p < 0.05
    assert "Unfinished runs" in text and "seed_9" in text
    assert (out / "val_error.png").stat().st_size > 0 and (out / "dropped_fraction.png").stat().st_size > 0


def test_paired_test_by_seed(tmp_path):
    for seed, (b, m) in enumerate([(30.0, 29.0), (35.0, 34.1), (40.0, 38.9)]):
        make_run(tmp_path, "baseline", seed, b)
        make_run(tmp_path, "maxdropout", seed, m, slots=MAXDROP)
    report([tmp_path], tmp_path / "r", baseline="baseline", test="paired")
    row = list(csv.DictReader(open(tmp_path / "r" / "report.csv")))[1]
    # Welch would see no difference in such spread-out seeds; the paired test does.
    assert float(row["p vs baseline (paired t-test by seed)"]) < 0.01


def test_best_val_error_is_the_minimum_over_epochs(tmp_path):
    make_run(tmp_path, "a", 0, 10.0, val=[40.0, 20.0, 25.0])
    report([tmp_path], tmp_path / "r")
    assert list(csv.DictReader(open(tmp_path / "r" / "report.csv")))[0]["best val error %"] == "20.00"


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
    assert list(csv.DictReader(open(tmp_path / "r" / "report.csv")))[0]["seeds"] == "2"

    cfg["trainer"]["max_epochs"] = 9  # a real difference between two seeds of one row
    (newer / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ReportError, match=r"the runs of config 'baseline' differ among themselves in trainer.max_epochs"
    ):
        report([tmp_path], tmp_path / "r")
