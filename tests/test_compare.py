"""The regression gate on synthetic samples and golden records."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench.compare import Threshold, compare_records, compare_runs, judge, mann_whitney_less
from bench.config import CellConfig
from bench.records import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "golden", "records.jsonl")
REPEATS = CellConfig("numpy", "lstm", "loop").repeats   # the default number of repeats
NOISE = 0.03   # 3% run-to-run spread (lognormal sigma), about what a quiet 2-core machine shows


def _draws(rng, scale, n=REPEATS):
    return rng.lognormal(0.0, NOISE, size=n) * scale


def test_aa_false_alarm_rate_at_most_one_percent():
    rng = np.random.default_rng(123)
    th = Threshold.parse("10%")
    alarms = sum(judge(_draws(rng, 100.0), _draws(rng, 100.0), th, seed=i)[0] == "REGRESSION"
                 for i in range(600))
    assert alarms / 600 <= 0.01


def test_ten_percent_slowdown_caught_at_least_95_percent():
    rng = np.random.default_rng(321)
    th = Threshold.parse("10%")
    caught = sum(judge(_draws(rng, 100.0), _draws(rng, 90.0), th, seed=i)[0] == "REGRESSION"
                 for i in range(600))
    assert caught / 600 >= 0.95


def test_small_real_slowdown_is_not_a_regression():
    rng = np.random.default_rng(5)
    th = Threshold.parse("10%")
    verdicts = [judge(rng.lognormal(0, 0.005, 15) * 100, rng.lognormal(0, 0.005, 15) * 98, th, seed=i)[0]
                for i in range(50)]
    assert verdicts.count("slower, within threshold") >= 45
    assert "REGRESSION" not in verdicts


def test_a_significant_speedup_is_an_improvement_never_no_change():
    rng = np.random.default_rng(6)
    assert judge(_draws(rng, 100.0), _draws(rng, 130.0), Threshold(0.1))[0] == "improvement"
    verdicts = [judge(rng.lognormal(0, 0.005, 15) * 100, rng.lognormal(0, 0.005, 15) * 102,
                      Threshold(0.1), seed=i)[0] for i in range(20)]
    assert set(verdicts) == {"faster, within threshold"}


def test_too_few_repeats_to_reach_the_level_are_not_called_no_change():
    # 3 against 3 (at best p = 1/20) and 4 against 4 (1/70) can never reach 0.01
    for n in (2, 3, 4):
        base, new = [100.0 + i for i in range(n)], [200.0 + i for i in range(n)]
        assert judge(base, new, Threshold(0.1))[0] == "too few repeats to tell"
        assert judge(new, base, Threshold(0.1))[0] == "too few repeats to tell"
    # 5 against 4 can (1/126): complete separation is significant
    assert judge([100.0, 101, 102, 103, 104], [200.0, 201, 202, 203], Threshold(0.1))[0] == "improvement"


def test_mann_whitney_exact_values():
    # complete separation of 3 vs 3: one arrangement in C(6,3) = 20
    assert mann_whitney_less([1, 2, 3], [4, 5, 6]) == pytest.approx(1 / 20)
    assert mann_whitney_less([4, 5, 6], [1, 2, 3]) == pytest.approx(1.0)
    # U = 1 (only 5 > 2); P(U <= 1) = 2 of the 6 arrangements of 2 vs 2
    assert mann_whitney_less([1, 5], [2, 6]) == pytest.approx(2 / 6)


@pytest.mark.parametrize("text,value", [("10%", 0.1), ("0.15", 0.15), ("median:7%", 0.07)])
def test_threshold_parsing(text, value):
    assert Threshold.parse(text).fraction == pytest.approx(value)


@pytest.mark.parametrize("bad", ["abc", "150%", "mean:5%", "0"])
def test_threshold_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        Threshold.parse(bad)


def _slowed(records, factor, which=lambda r: True):
    out = copy.deepcopy(records)
    for r in out:
        if r["status"] == "ok" and which(r):
            r["train_samples_per_s"] = [x * factor for x in r["train_samples_per_s"]]
    return out


def test_golden_records_same_run_has_no_regression():
    recs = read_records(GOLDEN)
    changes, problems = compare_records(recs, copy.deepcopy(recs), Threshold(0.1))
    assert not problems and changes
    # 7 repeats against 7: no change; the accuracy cells' 3 against 3 cannot tell
    expected = sorted("no change (noise)" if len(r[m]) >= 5 else "too few repeats to tell"
                      for r in recs if r["status"] == "ok"
                      for m in ("train_samples_per_s", "infer_samples_per_s"))
    assert sorted(c.verdict for c in changes) == expected
    assert expected.count("no change (noise)") == 16


def test_golden_records_injected_slowdown_is_flagged_only_where_injected():
    recs = read_records(GOLDEN)
    slow = _slowed(recs, 0.8, lambda r: r["strategy"] == "levels" and r["accuracy"] is None)
    changes, _ = compare_records(recs, slow, Threshold(0.1))
    flagged = {(c.label, c.metric) for c in changes if c.verdict == "REGRESSION"}
    assert flagged == {("torch/treelstm/levels sst b25 cpu", "train_samples_per_s")}


def test_refuses_different_machines_threads_or_schema_unless_forced():
    recs = read_records(GOLDEN)
    for field, value in (("machine", {"cpu": "Other", "cores": 64, "gpu": None}),
                         ("threads", 8), ("schema_version", 3)):
        other = copy.deepcopy(recs)
        for r in other:
            r[field] = value
        changes, problems = compare_records(recs, other, Threshold(0.1))
        assert problems and not changes, field
        _, problems = compare_records(recs, other, Threshold(0.1), force=True)
        assert problems


def test_schema_1_and_2_compare_as_one():
    # 2 added statuses; the published runs (schema 1) stay comparable with new ones
    recs = read_records(GOLDEN)
    newer = [dict(r, schema_version=2) for r in recs]
    changes, problems = compare_records(recs, newer, Threshold(0.1))
    assert not problems and changes


def _cli(base, new, *extra):
    return subprocess.run([sys.executable, "-m", "bench", "compare", base, new] + list(extra),
                          cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_cli_exit_codes(tmp_path):
    recs = read_records(GOLDEN)
    slow = tmp_path / "slow.jsonl"
    with open(slow, "w") as fh:
        for r in _slowed(recs, 0.7):
            fh.write(json.dumps(r) + "\n")
    same = _cli(GOLDEN, GOLDEN)
    assert same.returncode == 0 and "0 regressions" in same.stdout
    bad = _cli(GOLDEN, str(slow))
    assert bad.returncode == 1 and "REGRESSION" in bad.stdout
    assert _cli(GOLDEN, str(slow), "--threshold", "40%").returncode == 0
    other = tmp_path / "other.jsonl"
    with open(other, "w") as fh:
        for r in recs:
            fh.write(json.dumps(dict(r, threads=16)) + "\n")
    refused = _cli(GOLDEN, str(other))
    assert refused.returncode == 2 and "refusing" in refused.stderr
    assert _cli(GOLDEN, str(other), "--force").returncode == 0


def test_cells_ok_in_base_but_missing_failed_or_timed_out_in_new_are_lost(tmp_path):
    recs = read_records(GOLDEN)
    ok = [r for r in recs if r["status"] == "ok"]
    new = copy.deepcopy(recs)
    gone, failed, timed = ok[0]["cell_id"], ok[1]["cell_id"], ok[2]["cell_id"]
    new = [r for r in new if r["cell_id"] != gone]
    for r in new:
        if r["cell_id"] == failed:
            r.update(status="failed", reason="not equivalent: logits differ")
        if r["cell_id"] == timed:
            r.update(status="timeout", reason="no result after 900 s")
    changes, problems, lost, _ = compare_runs(recs, new, Threshold(0.1))
    assert not problems and changes
    assert sorted(x.why.split(":")[0] for x in lost) == ["failed in NEW", "missing in NEW",
                                                         "timeout in NEW"]
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in new))
    res = _cli(GOLDEN, str(path))
    assert res.returncode == 1 and "0 regressions, 0 improvements, 3 lost cells" in res.stdout
    assert "missing in NEW" in res.stdout
    allowed = _cli(GOLDEN, str(path), "--allow-missing")
    assert allowed.returncode == 0 and "accepted by --allow-missing" in allowed.stdout


def test_a_retried_cell_is_judged_by_its_last_record(tmp_path):
    recs = read_records(GOLDEN)
    first = next(r for r in recs if r["status"] == "ok")
    path = tmp_path / "new.jsonl"
    # the cell failed first, then a --retry-failed run appended its new record
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            [dict(first, status="crashed", reason="killed by signal 9")] + recs))
    res = _cli(GOLDEN, str(path))
    assert res.returncode == 0 and "0 lost cells" in res.stdout
