"""Weight decay (coupled L2): the reference's update, the cell's identity, the command line.

The frameworks' steps with a decay are in tests/test_equivalence.py; the gate's
decay checks in tests/test_gate.py.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from bench import reference
from bench.batches import make_batch
from bench.cell import base_record
from bench.config import CellConfig, preset
from bench.interface import ADAGRAD, ADAM
from bench.params import ModelConfig, init_params
from bench.tasks import load_listops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return load_listops(30, 3, 3, seed=4, max_length=30)


def _setup(model, data, optimizer, lr, wd):
    cfg = ModelConfig(model, vocab_size=16, embed_dim=5, hidden=4, num_classes=10,
                      optimizer=optimizer, lr=lr, weight_decay=wd)
    p = {k: v.astype(np.float64) for k, v in init_params(cfg, 0, embed_std=0.5).items()}
    batch = make_batch(cfg.family, data.train[:3])
    return cfg, p, batch


def _by_hand(cfg, p, batch):
    """One step from a fresh state, written out: every optimiser sees d = g + wd * theta."""
    _, g = reference.loss_and_grads(cfg, p, batch)
    out = {}
    for k in p:
        d = g[k] + cfg.weight_decay * p[k]
        if cfg.optimizer == "sgd":
            out[k] = p[k] - cfg.lr * d
        elif cfg.optimizer == "adagrad":
            out[k] = p[k] - cfg.lr * d / (np.sqrt(ADAGRAD["initial_accumulator"] + d * d)
                                         + ADAGRAD["eps"])
        else:   # Adam's first step: m_hat = d, v_hat = d^2
            out[k] = p[k] - cfg.lr * d / (np.abs(d) + ADAM["eps"])
    return out


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 1e-3), ("adagrad", 0.05)])
@pytest.mark.parametrize("model", ["lstm", "treelstm"])
def test_reference_decay_step_is_the_hand_derivation(model, optimizer, lr, data):
    for wd in (0.0, 0.3):
        cfg, p, batch = _setup(model, data, optimizer, lr, wd)
        got, masks = reference.optimizer_steps(cfg, p, batch, 1)
        want = _by_hand(cfg, p, batch)
        for k in p:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12, err_msg=k)
            assert masks[k].mean() > 0.5, k
    # and the decay moved them: the check above is not of two equal no-decay steps
    plain, _ = reference.optimizer_steps(replace(cfg, weight_decay=0.0), p, batch, 1)
    assert max(np.abs(got[k] - plain[k]).max() for k in p) > 1e-4


def test_decay_is_the_gradient_of_half_wd_times_the_squared_norm(data):
    """Two SGD steps with decay wd equal two steps of plain gradient descent on
    loss + wd / 2 * ||theta||^2, its gradient taken by central differences."""
    wd, lr = 0.3, 0.5
    cfg, p, batch = _setup("elman", data, "sgd", lr, wd)
    got, _ = reference.optimizer_steps(cfg, p, batch, 2)
    plain = replace(cfg, weight_decay=0.0)
    q = {k: v.copy() for k, v in p.items()}
    for _ in range(2):
        _, g = reference.loss_and_grads(plain, q, batch)
        penalty = {}
        for k, v in q.items():
            num = np.zeros_like(v)
            for i in range(v.size):
                e = np.zeros(v.size)
                e[i] = 1e-4
                e = e.reshape(v.shape)
                num.flat[i] = (wd / 2 * (np.sum((v + e) ** 2) - np.sum((v - e) ** 2))) / 2e-4
            penalty[k] = num
        q = {k: q[k] - lr * (g[k] + penalty[k]) for k in q}
    for k in p:
        np.testing.assert_allclose(got[k], q[k], rtol=0, atol=1e-9, err_msg=k)


def test_zero_decay_is_the_step_without_it_bit_for_bit(data):
    g = np.arange(6.0).reshape(2, 3)
    assert reference.decayed(g, np.ones((2, 3)), 0.0) is g
    for optimizer, lr in (("sgd", 0.5), ("adam", 1e-3), ("adagrad", 0.05)):
        cfg, p, batch = _setup("rvnn", data, optimizer, lr, 0.0)
        old = ModelConfig("rvnn", vocab_size=16, embed_dim=5, hidden=4, num_classes=10,
                          optimizer=optimizer, lr=lr)      # a config from before the field
        a, ma = reference.optimizer_steps(cfg, p, batch, 2)
        b, mb = reference.optimizer_steps(old, p, batch, 2)
        want = _by_hand(cfg, p, batch) if optimizer == "sgd" else None
        for k in p:
            assert np.array_equal(a[k], b[k]) and np.array_equal(ma[k], mb[k])
        if want is not None:
            one, _ = reference.optimizer_steps(cfg, p, batch, 1)
            for k in p:
                assert np.array_equal(one[k], want[k]), k


def test_model_config_refuses_a_bad_decay():
    for bad in (-0.1, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="weight_decay"):
            ModelConfig("lstm", vocab_size=5, weight_decay=bad)


# --- the cell's identity and record ---

def test_a_zero_decay_keeps_every_existing_key_and_a_non_zero_one_changes_it():
    golden = os.path.join(ROOT, "tests", "data", "golden", "records.jsonl")
    checked = 0
    for line in open(golden):
        r = json.loads(line)
        assert "weight_decay" not in r["config"]
        cfg = CellConfig.from_dict(r["config"])
        assert cfg.weight_decay == 0.0 and cfg.key() == r["cell_id"]
        assert replace(cfg, weight_decay=0.0).key() == r["cell_id"]
        assert replace(cfg, weight_decay=1e-4).key() != r["cell_id"]
        checked += 1
    assert checked
    base = CellConfig("torch", "treelstm", "levels", epochs=3.0)
    keys = {replace(base, weight_decay=wd).key() for wd in (0.0, 1e-4, 1e-3)}
    assert len(keys) == 3
    assert "wd" not in base.label() and "wd0.0001" in replace(base, weight_decay=1e-4).label()
    for name in ("smoke", "quick", "full", "parity", "gpu", "readout"):
        assert {c.weight_decay for c in preset(name).cells()} == {0.0}, name


def test_records_and_their_configs_carry_the_decay():
    cfg = CellConfig("torch", "lstm", "fused", weight_decay=1e-4)
    rec = base_record(cfg)
    assert rec["weight_decay"] == 1e-4 and rec["config"]["weight_decay"] == 1e-4
    assert CellConfig.from_dict(rec["config"]) == cfg and rec["cell_id"] == cfg.key()


def test_cell_config_refuses_a_bad_decay():
    for bad in (-1e-3, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="weight_decay"):
            CellConfig("torch", "lstm", "fused", weight_decay=bad)


# --- the command line ---

def _bench(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "bench", "run", "--preset", "smoke",
                           "--frameworks", "numpy", "--models", "lstm", "--strategies", "loop",
                           "--tasks", "synth-left-8"] + list(args),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bad", ["-0.01", "nan", "inf", "-inf", "x", ""])
def test_cli_refuses_a_bad_weight_decay_in_one_line(tmp_path, bad):
    res = _bench("--out", str(tmp_path / "run"), "--weight-decay", bad)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "weight decay" in lines[0] or "--weight-decay" in lines[0], lines[0]
    assert not os.path.exists(str(tmp_path / "run"))


def test_cli_weight_decay_reaches_the_cells(tmp_path):
    res = _bench("--out", str(tmp_path / "run"), "--weight-decay", "1e-4", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines() == ["numpy/lstm/loop synth-left-8 b8 cpu wd0.0001"]
    res = _bench("--out", str(tmp_path / "run"), "--weight-decay", "0", "--dry-run")
    assert res.returncode == 0 and "wd" not in res.stdout, res.stdout


def test_cli_learning_rate_and_optimiser_reach_the_cells(tmp_path):
    from bench.cli import build_parser, select_cells
    args = build_parser().parse_args(["run", "--preset", "parity", "--frameworks", "torch",
                                      "--models", "treelstm", "--tasks", "sst", "--lr", "5e-4",
                                      "--optimizer", "adagrad", "--epochs", "4"])
    cells = select_cells(args)
    assert cells and {(c.optimizer, c.lr, c.epochs) for c in cells} == {("adagrad", 5e-4, 4.0)}
    plain = select_cells(build_parser().parse_args(
        ["run", "--preset", "parity", "--frameworks", "torch", "--models", "treelstm",
         "--tasks", "sst"]))
    assert {(c.optimizer, c.lr) for c in plain} == {("adam", 2e-3)}
    assert {c.key() for c in cells}.isdisjoint(c.key() for c in plain)
    assert cells[0].label().endswith(" 4ep adagrad lr0.0005 seed0")
    for bad in ("0", "-1e-3", "nan", "inf", "x"):
        res = _bench("--out", str(tmp_path / "run"), "--lr=" + bad)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "lr must be" in res.stderr, res.stderr
    res = _bench("--out", str(tmp_path / "run"), "--optimizer", "rmsprop")
    assert res.returncode == 2 and "--optimizer" in res.stderr, res.stderr


def test_the_report_never_averages_accuracies_of_different_decays():
    pytest.importorskip("pandas")
    from bench.report import accuracy_table, summarise
    base = {"schema_version": 2, "framework": "torch", "model": "treelstm", "strategy": "levels",
            "task": "sst", "device": "cpu", "batch_size": 25, "threads": 1, "status": "ok",
            "machine": {"cpu": "x", "cores": 2}, "train_samples_per_s": [1.0],
            "infer_samples_per_s": [1.0], "config": {"loss_mode": "all", "train_mode": "full"}}
    recs = [dict(base, cell_id="a%d" % i, seed=i, weight_decay=wd,
                 accuracy={"epochs": 3, "test": acc, "dev": acc})
            for i, (wd, acc) in enumerate(((0.0, 0.40), (0.0, 0.42), (1e-4, 0.46)))]
    table = accuracy_table(summarise(recs)).set_index("weight_decay")
    assert table.loc[0.0, "test_mean"] == pytest.approx(0.41) and table.loc[0.0, "seeds"] == 2
    assert table.loc[1e-4, "test_mean"] == pytest.approx(0.46) and table.loc[1e-4, "seeds"] == 1
