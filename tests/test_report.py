"""Reports are derived from records only: golden records in, known tables out."""

import json
import os
import shutil
import sys

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from bench.coverage import SEED_FRAMEWORKS  # noqa: E402
from bench.report import SUMMARY_COLUMNS, summarise, write_report  # noqa: E402
from bench.records import read_records  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(ROOT, "tests", "data", "golden")
CONTRACT = ["framework", "model", "strategy", "task", "device", "batch_size", "threads", "status",
            "train_samples_per_s", "infer_samples_per_s", "latency_ms_p50", "compile_s",
            "peak_rss_mb", "speedup_vs_baseline", "roofline_pct", "accuracy"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    run = os.path.join(out, "run", "torch")
    os.makedirs(run)
    for name in ("records.jsonl", "env.json"):
        shutil.copy(os.path.join(GOLDEN_DIR, name), run)
    write_report(os.path.join(out, "run"), out)
    return out


def test_summary_csv_keeps_its_column_contract(report_dir):
    df = pd.read_csv(os.path.join(report_dir, "summary.csv"))
    assert list(df.columns[:len(CONTRACT)]) == CONTRACT
    assert list(df.columns) == SUMMARY_COLUMNS
    assert len(df) == len(read_records(os.path.join(GOLDEN_DIR, "records.jsonl")))


def test_medians_speedups_and_roofline():
    df = summarise(read_records(os.path.join(GOLDEN_DIR, "records.jsonl")))
    row = lambda fw, m, s, b=25: df[(df.framework == fw) & (df.model == m) & (df.strategy == s)  # noqa: E731
                                    & (df.batch_size == b) & df.accuracy.isna()].iloc[0]
    lv = row("torch", "treelstm", "levels")
    assert lv.train_samples_per_s == 200 and lv.infer_samples_per_s == 800
    assert lv.speedup_vs_baseline == pytest.approx(20.0)     # 200 / median 10 of recursive
    assert lv.infer_speedup_vs_baseline == pytest.approx(20.0)
    # roofline: 200 ex/s * 3e6 flop/ex / 1e10 flop/s = 6 %
    assert lv.roofline_pct == pytest.approx(6.0)
    assert row("jax", "treelstm", "compiled").speedup_vs_baseline == pytest.approx(30.0)
    # no baseline in the same group: no speedup rather than a wrong one
    assert pd.isna(row("torch", "lstm", "fused", b=100).speedup_vs_baseline)
    failed = df[(df.strategy == "compiled") & (df.framework == "torch")].iloc[0]
    assert failed.status == "failed" and pd.isna(failed.train_samples_per_s)


def test_report_markdown_has_every_section_and_only_verified_numbers(report_dir):
    text = open(os.path.join(report_dir, "report.md")).read()
    for heading in ("## Environment", "## Coverage", "## Results", "## Accuracy", "## Plots"):
        assert heading in text
    assert "Golden CPU (2 cores)" in text
    # the failed (not equivalent) cell appears only in the not-timed table, with its reason
    assert "not equivalent: logits differ by 0.1" in text
    results = text.split("## Results")[1].split("### Cells not timed")[0]
    assert "| torch | compiled |" not in results
    # accuracy over three seeds: mean 47.0 +- 1.0 on test
    assert "47.0 ± 1.0" in text
    for name in SEED_FRAMEWORKS:
        assert "| %s |" % name in text


def test_plots_are_written(report_dir):
    for name in ("throughput.png", "batch_size.png", "accuracy.png"):
        path = os.path.join(report_dir, name)
        assert os.path.getsize(path) > 5000
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _acc_record(fw, model, task, test, seed=0, epochs=1.0, **training):
    """An accuracy cell trained as the parity preset trains (Adam, lr 2e-3) unless
    ``training`` says otherwise (optimizer, lr, weight_decay)."""
    from bench.cell import base_record
    from bench.config import CellConfig
    strategy = "levels" if model in ("rvnn", "treelstm") else "fused"
    training = dict({"optimizer": "adam", "lr": 2e-3}, **training)
    rec = base_record(CellConfig(fw, model, strategy, task=task, seed=seed, epochs=epochs,
                                 **training))
    rec.update(status="ok", train_samples_per_s=[10.0], infer_samples_per_s=[20.0],
               accuracy={"epochs": epochs, "dev": test, "test": test})
    return rec


def test_different_budgets_are_never_averaged_or_compared():
    from bench.report import accuracy_table, anchors_rows, summarise
    recs = [_acc_record("torch", "treelstm", "sst", 0.45, seed=s) for s in (0, 1)]
    recs += [_acc_record("torch", "treelstm", "sst", 0.47, seed=s, epochs=8.0) for s in (0, 1)]
    recs += [_acc_record("jax", "treelstm", "sst", 0.452, seed=0)]
    df = summarise(recs)
    acc = accuracy_table(df)
    assert sorted(zip(acc["framework"], acc["epochs"], acc["test_mean"].round(3))) == [
        ("jax", 1.0, 0.452), ("torch", 1.0, 0.45), ("torch", 8.0, 0.47)]
    rows = {r[0]: r for r in anchors_rows(df)}
    # the spread is taken within the 1-epoch budget only; 8 epochs has one framework: no spread row
    assert rows["sst, 1 epochs: every framework's Tree-LSTM within 1 point of the others"][2].startswith(
        "spread 0.2")
    assert not any(k.startswith("sst, 8 epochs") for k in rows)
    assert rows["sst treelstm (torch, 8 epochs) at or above RNTN"][3] == "met"
    assert rows["sst treelstm (torch, 1 epochs) at or above RNTN"][3] == "missed"


def test_a_tuned_variant_is_its_own_row_named_by_its_training():
    from bench.report import accuracy_table, anchors_rows, summarise
    from bench.report.sections import accuracy_section
    recs = [_acc_record(fw, "treelstm", "sst", acc, seed=s)
            for fw, acc in (("torch", 0.450), ("jax", 0.452)) for s in (0, 1)]
    tuned = dict(epochs=4.0, lr=1e-3, weight_decay=1e-5)
    recs += [_acc_record(fw, "treelstm", "sst", acc, seed=s, **tuned)
             for fw, acc in (("torch", 0.466), ("jax", 0.470)) for s in (0, 1)]
    # same epochs and decay as the tuned cells, another learning rate: a third budget
    recs += [_acc_record("torch", "treelstm", "sst", 0.40, epochs=4.0, weight_decay=1e-5)]
    df = summarise(recs)
    acc = accuracy_table(df)
    assert len(acc) == 5 and set(acc["seeds"]) == {1, 2}
    rows = {r[0]: r for r in anchors_rows(df)}
    assert rows["sst treelstm (torch, 1 epochs) at or above RNTN"][2:] == ["45.0 ± 0.0 (2 seeds)",
                                                                          "missed"]
    name = "sst treelstm (torch, 4 epochs, adam lr 0.001, wd 1e-05) at or above RNTN"
    assert rows[name][2:] == ["46.6 ± 0.0 (2 seeds)", "met"]
    assert rows["sst treelstm (torch, 4 epochs, wd 1e-05) at or above RNTN"][2:] == [
        "40.0 ± 0.0 (1 seeds)", "missed"]
    spread = "sst, 4 epochs, adam lr 0.001, wd 1e-05: every framework's Tree-LSTM within 1 point " \
             "of the others"
    assert rows[spread][2].startswith("spread 0.4") and rows[spread][3] == "met"
    assert "| adam lr 0.001, wd 1e-05 |" in accuracy_section(df)
    from bench.report.anchors import anchors_section
    assert "budget other than the parity preset's (adam lr 0.002" in anchors_section(df)
    plain = summarise(recs[:4])
    assert "budget other than" not in anchors_section(plain)


def test_anchor_verdicts_follow_the_measured_accuracy():
    from bench.report import anchors_rows, summarise
    recs = [_acc_record("torch", "treelstm", "sst", 0.470), _acc_record("jax", "treelstm", "sst", 0.462),
            _acc_record("torch", "rvnn", "sst", 0.400), _acc_record("jax", "rvnn", "sst", 0.440),
            _acc_record("torch", "treelstm", "listops", 0.60), _acc_record("torch", "lstm", "listops", 0.50)]
    rows = {r[0]: r for r in anchors_rows(summarise(recs))}
    spread = rows["sst, 1 epochs: every framework's Tree-LSTM within 1 point of the others"]
    assert spread[2].startswith("spread 0.8") and spread[3] == "met"
    assert rows["sst treelstm (torch, 1 epochs) at or above RNTN"][3] == "met"
    assert rows["sst treelstm (jax, 1 epochs) at or above RNTN"][3] == "met"
    assert rows["sst rvnn (torch, 1 epochs) at or above plain RvNN"][3] == "missed"
    assert rows["sst rvnn (jax, 1 epochs) at or above plain RvNN"][3] == "met"
    assert rows["listops (torch, 1 epochs): Tree-LSTM vs LSTM"][2].startswith("+10.0 points")
    assert rows["sst2 treelstm at or above RNTN (binary SST)"][3] == "not measured"
    assert rows["sst2 rvnn at or above plain RvNN (binary SST)"][3] == "not measured"
    # a wider spread is a miss
    recs[1] = _acc_record("jax", "treelstm", "sst", 0.450)
    rows = {r[0]: r for r in anchors_rows(summarise(recs))}
    assert rows["sst, 1 epochs: every framework's Tree-LSTM within 1 point of the others"][3] == "missed"


def test_binary_sst_has_its_own_anchors():
    from bench.report import anchors_rows, summarise
    recs = [_acc_record("torch", "treelstm", "sst2", 0.860), _acc_record("torch", "rvnn", "sst2", 0.800)]
    rows = {r[0]: r for r in anchors_rows(summarise(recs))}
    assert rows["sst2 treelstm (torch, 1 epochs) at or above RNTN"][1:] == [
        ">= 85.4", "86.0 ± 0.0 (1 seeds)", "met"]
    assert rows["sst2 rvnn (torch, 1 epochs) at or above plain RvNN"][3] == "missed"
    # the 5-class goals are still listed, as not measured, when only binary cells exist
    assert rows["sst treelstm at or above RNTN (fine-grained SST)"][3] == "not measured"


def test_env_table_names_frameworks_from_the_records_too():
    from bench.report.sections import env_section
    env = {"_dir": "gpu", "frameworks": {"jax": "0.11.2"}, "machine": {"cpu": "x", "cores": 16}}
    recs = [{"run": "gpu", "framework": "torch", "framework_version": "2.11.0"},
            {"run": "other", "framework": "tensorflow", "framework_version": "2.21.0"}]
    text = env_section([env], recs)
    assert "jax 0.11.2, torch 2.11.0" in text and "tensorflow" not in text


def test_plots_take_the_newest_run_of_a_cell_that_several_runs_timed():
    from bench.report.figures import newest_run_per_cell
    old, new, other = (_acc_record("torch", "treelstm", "sst", 0.4) for _ in range(3))
    other["strategy"] = "recursive"
    for rec, run, speed in ((old, "quick", 300.0), (new, "quick-packed", 800.0), (other, "quick", 50.0)):
        rec.update(accuracy=None, run=run, train_samples_per_s=[speed], infer_samples_per_s=[speed])
    envs = [{"_dir": "quick", "time": "2026-11-26T04:00:00Z"},
            {"_dir": "quick-packed", "time": "2026-11-26T07:00:00Z"}]
    kept = newest_run_per_cell(summarise([old, new, other]), envs)
    assert sorted(zip(kept["strategy"], kept["train_samples_per_s"])) == [("levels", 800.0),
                                                                        ("recursive", 50.0)]


def test_threads_a_framework_did_not_apply_are_shown():
    from bench.report.sections import results_section
    rec = _acc_record("dynet", "treelstm", "sst", 0.4)
    rec.update(accuracy=None, info={"threads": {"requested": 2, "applied": 1}})
    df = summarise([rec])
    assert df["threads_applied"].iloc[0] == 1
    assert "| 2 (1 applied) |" in results_section(df, [rec])


def test_keras_cost_is_the_raw_backend_throughput_over_keras():
    from bench.report import summarise, wrapper_rows
    fast = _acc_record("jax", "treelstm", "sst", 0.4)
    slow = _acc_record("keras-jax", "treelstm", "sst", 0.4)
    alone = _acc_record("keras-torch", "treelstm", "sst", 0.4)   # no torch cell: no row
    for rec, speed in ((fast, 300.0), (slow, 100.0), (alone, 50.0)):
        rec.update(accuracy=None, train_samples_per_s=[speed], infer_samples_per_s=[2 * speed])
    rows = wrapper_rows(summarise([fast, slow, alone]))
    assert len(rows) == 1 and rows[0][0] == "keras-jax vs jax"
    assert rows[0][6] == "3.00x" and rows[0][7] == "3.00x"


def test_repeats_count_only_the_finite_samples_the_medians_used():
    rec = _acc_record("torch", "lstm", "sst", 0.4)
    rec.update(accuracy=None, train_samples_per_s=[float("nan"), 10.0, 12.0, float("inf")],
               infer_samples_per_s=[20.0, 21.0, 22.0])
    row = summarise([rec]).iloc[0]
    assert row["train_samples_per_s"] == 11.0 and row["repeats"] == 2


def test_an_interrupted_report_leaves_the_previous_outputs_whole(tmp_path, monkeypatch):
    from bench.report import write
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(GOLDEN_DIR, "records.jsonl"), str(run))
    write_report(str(run), str(run))
    names = sorted(n for n in os.listdir(str(run)) if n != "records.jsonl")
    assert "report.md" in names and "summary.csv" in names and "throughput.png" in names
    before = {n: (run / n).read_bytes() for n in names}

    def interrupted(df, out_dir, envs=None):
        with open(os.path.join(out_dir, "throughput.png"), "wb") as fh:
            fh.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "plots", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(str(run), str(run))
    assert {n: (run / n).read_bytes() for n in names} == before
    assert sorted(os.listdir(str(run))) == sorted(names + ["records.jsonl"])   # no scratch left


def _timed_record(fw, model, strategy, train, infer, phases=None, wall=None):
    from bench.cell import base_record
    from bench.config import CellConfig
    rec = base_record(CellConfig(fw, model, strategy))
    rec.update(status="ok", train_samples_per_s=train, infer_samples_per_s=infer)
    if phases is not None:
        rec.update(phase_s=phases, cell_wall_s=wall)
    return rec


def test_the_throughput_plot_shows_inference_only_cells_with_their_iqr():
    from bench.report import throughput_bars
    recs = [_timed_record("torch", "lstm", "fused", [100.0, 110.0, 120.0, 130.0, 140.0],
                          [400.0, 420.0, 440.0]),
            _timed_record("numpy", "lstm", "loop", [], [50.0, 60.0, 70.0, 80.0, 90.0])]
    main, per = throughput_bars(summarise(recs))
    assert main == ("sst", 25, "cpu") and list(per) == ["lstm"]
    rows = per["lstm"].set_index("framework")
    assert list(per["lstm"]["framework"]) == ["numpy", "torch"]       # inference-only sorts first
    assert pd.isna(rows.loc["numpy", "train_samples_per_s"])
    assert rows.loc["numpy", "infer_samples_per_s"] == 70.0
    assert (rows.loc["numpy", "infer_q1"], rows.loc["numpy", "infer_q3"]) == (60.0, 80.0)
    assert (rows.loc["torch", "train_q1"], rows.loc["torch", "train_q3"]) == (110.0, 130.0)


def test_overhead_is_everything_but_the_timed_passes(tmp_path):
    from bench.report.sections import overhead_section
    phases = {"startup": 0.5, "data": 0.8, "imports": 2.0, "pool": 0.2, "first_call": 10.0,
              "gate": 1.0, "warmup": 0.5, "timed": 4.0, "latency": 0.3, "gemm": 0.6, "exit": 0.1}
    recs = [_timed_record("torch", "lstm", "compiled", [100.0] * 3, [200.0] * 3, phases, 20.0),
            _timed_record("torch", "lstm", "fused", [100.0] * 3, [200.0] * 3,
                          dict(phases, first_call=0.0), 10.0),
            _timed_record("jax", "lstm", "loop", [100.0] * 3, [200.0] * 3)]     # an older record
    df = summarise(recs)
    assert list(df["overhead_s"][:2]) == [16.0, 6.0] and list(df["timed_s"][:2]) == [4.0, 4.0]
    assert pd.isna(df["overhead_s"].iloc[2])
    df["_phase_s"] = [r.get("phase_s") for r in recs]
    text = overhead_section(df)
    assert "| torch | 2 | 30 | 8 | 22 | 73% |" in text
    assert ("| torch/lstm/compiled | sst b25 | 20.0 | 4.0 | 16.0 (80%) | 0.5 | 0.8 | 2.0 | 0.2 | 10.0 |"
            in text)
    assert "jax" not in text
    # and in the CSV, per cell
    run = tmp_path / "run"
    run.mkdir()
    with open(str(run / "records.jsonl"), "w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    write_report(str(run), str(run))
    csv = pd.read_csv(str(run / "summary.csv"))
    assert list(csv["overhead_s"][:2]) == [16.0, 6.0]
    assert "## Where each cell's time goes" in (run / "report.md").read_text()


def test_a_framework_whose_run_did_not_finish_is_marked_incomplete(tmp_path):
    from bench.config import CellConfig
    from bench.runner import planned_cells
    cells = [CellConfig("torch", "lstm", s) for s in ("loop", "fused", "compiled")]
    run = tmp_path / "latest" / "torch"
    run.mkdir(parents=True)
    done = _timed_record("torch", "lstm", "loop", [10.0] * 3, [20.0] * 3)
    (run / "records.jsonl").write_text(json.dumps(done) + "\n")
    env = {"time": "T", "planned_cells": planned_cells(cells)}
    (run / "env.json").write_text(json.dumps(env))
    write_report(str(tmp_path / "latest"), str(tmp_path / "latest"))
    text = (tmp_path / "latest" / "report.md").read_text()
    assert "**Incomplete:** torch 1 of 3 planned cells" in text
    assert ("| PyTorch | torch | loop | - | - | 1 | 0 | incomplete: torch 1 of 3 planned cells recorded"
            in text)
    # once the others are recorded, it is ok
    with open(str(run / "records.jsonl"), "a") as fh:
        for c in cells[1:]:
            fh.write(json.dumps(_timed_record("torch", "lstm", c.strategy, [10.0] * 3, [20.0] * 3)) + "\n")
    write_report(str(tmp_path / "latest"), str(tmp_path / "latest"))
    text = (tmp_path / "latest" / "report.md").read_text()
    assert "Incomplete" not in text and "incomplete" not in text
    assert "| PyTorch | torch | compiled, fused, loop | - | - | 3 | 0 | ok |" in text


def test_without_matplotlib_the_report_and_csv_are_whole_and_say_why(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(GOLDEN_DIR, "records.jsonl"), str(run))
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    write_report(str(run), str(run))
    assert sorted(os.listdir(str(run))) == ["records.jsonl", "report.md", "summary.csv"]
    assert "no plots: matplotlib is not installed here (pip install matplotlib)" in capsys.readouterr().err
    text = (run / "report.md").read_text()
    assert "## Results" in text and "No plots: matplotlib is not installed" in text


def test_without_pandas_the_report_is_one_line_naming_what_to_install(tmp_path, monkeypatch, capsys):
    from bench import cli
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(GOLDEN_DIR, "records.jsonl"), str(run))
    monkeypatch.setitem(sys.modules, "pandas", None)
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs pandas" in err and "pip install pandas matplotlib" in err
    assert sorted(os.listdir(str(run))) == ["records.jsonl"]


def test_compile_counts_and_warm_caches_in_the_results_table(tmp_path):
    import json
    recs = read_records(os.path.join(GOLDEN_DIR, "records.jsonl"))
    ok = [r for r in recs if r["status"] == "ok" and not r.get("accuracy")]
    ok[0]["info"] = dict(ok[0].get("info") or {}, compiles={"train": 3, "infer": 2, "cache": "off"})
    ok[1]["info"] = dict(ok[1].get("info") or {}, compiles={"train": 1, "infer": 1, "cache": "warm"})
    run = tmp_path / "run" / "x"
    os.makedirs(str(run))
    with open(str(run / "records.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in recs))
    write_report(str(tmp_path / "run"), str(tmp_path))
    text = open(str(tmp_path / "report.md")).read()
    assert "compiles (train/infer)" in text
    assert "| 3 / 2 |" in text and "| (warm cache) | 1 / 1 |" in text
    df = pd.read_csv(str(tmp_path / "summary.csv"))
    assert sorted(df.compiles_train.dropna().tolist()) == [1, 3]
    assert set(df.compile_cache.dropna()) == {"off", "warm"}


def test_each_fastest_strategy_is_set_against_the_plain_loop_and_plain_is_never_picked(tmp_path):
    from bench.fastest import fastest_strategies
    from bench.report import plain_section
    recs = [_timed_record("torch", "lstm", "plain", [100.0, 101.0, 102.0], [400.0, 410.0, 420.0]),
            _timed_record("torch", "lstm", "fused", [80.0, 81.0, 82.0], [500.0, 505.0, 510.0]),
            _timed_record("torch", "lstm", "loop", [50.0, 51.0, 52.0], [300.0, 300.0, 300.0]),
            # a plain cell faster than every strategy of its framework: still never the pick
            _timed_record("jax", "elman", "plain", [900.0] * 3, [900.0] * 3),
            _timed_record("jax", "elman", "compiled", [700.0, 800.0, 1100.0], [50.0] * 3)]
    recs[1]["repeats_cut"] = True
    text = plain_section(summarise(recs))
    assert "| torch/lstm | sst b25 cpu | fused | 81 / 101 | 0.80x (behind) | 505 / 410 | " \
           "1.23x (ahead) |" in text
    assert "| jax/elman | sst b25 cpu | compiled | 800 / 900 | 0.89x (IQRs overlap) |" in text
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert fastest_strategies(str(run)) == {("torch", "lstm", "cpu"): "fused",
                                            ("jax", "elman", "cpu"): "compiled"}
    write_report(str(run), str(run))
    report = (run / "report.md").read_text()
    assert "## Against the plain loop" in report and "0.80x (behind)" in report
    assert "| 3 (budget) |" in report     # the fused cell's samples were cut by its time budget
