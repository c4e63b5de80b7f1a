"""Reservoir (readout) training: spectral scaling, the ridge fit on data whose answer is known,
the feature configuration, readout cells end to end (verified features, a planted mismatch
caught), config keys, and the report's readout-vs-full table."""

import json
import os

import numpy as np
import pytest

from bench import readout, reference, registry
from bench.batches import make_batch
from bench.cell import base_record, run_cell
from bench.config import CellConfig, preset
from bench.params import MODELS, ModelConfig, init_params
from bench.tasks import Example
from bench.trees import build_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTED = [f for f in os.environ.get("BENCH_FRAMEWORKS", "").split(",") if f]
REQUIRED = [f for f in os.environ.get("BENCH_REQUIRE_FRAMEWORKS", "").split(",") if f]

# (model, number of H x H blocks in its recurrent / composition matrix)
BLOCKS = {"elman": 1, "lstm": 4, "rvnn": 2, "treelstm": 10}


def _cfg(model, **kw):
    base = dict(vocab_size=30, embed_dim=6, hidden=5, num_classes=3)
    base.update(kw)
    return ModelConfig(model, **base)


def _blocks(w, h):
    return [w[r:r + h, c:c + h] for r in range(0, w.shape[0], h) for c in range(0, w.shape[1], h)]


@pytest.mark.parametrize("model", MODELS)
def test_reservoir_scales_each_block_to_the_radius_and_nothing_else(model):
    cfg = _cfg(model)
    params = init_params(cfg, 1)
    res = readout.reservoir_params(cfg, params, 0.9)
    name = readout.RECURRENT[model]
    before, after = _blocks(params[name].astype(np.float64), 5), _blocks(res[name].astype(np.float64), 5)
    assert len(after) == BLOCKS[model]
    for b0, b1 in zip(before, after):
        assert readout.spectral_radius(b1) == pytest.approx(0.9, rel=1e-5)
        ratio = b1 / b0
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-5)     # a pure rescaling of the block
    for k in params:
        assert res[k].dtype == np.float32
        if k != name:
            np.testing.assert_array_equal(res[k], params[k])


def test_spectral_radius_and_scaling_edge_cases():
    rot = np.array([[0.0, -2.0], [2.0, 0.0]])        # eigenvalues +-2i
    assert readout.spectral_radius(rot) == pytest.approx(2.0)
    nil = np.array([[0.0, 1.0], [0.0, 0.0]])         # radius 0: left alone, not divided by 0
    np.testing.assert_array_equal(readout.scale_blocks(nil, 2, 0.5), nil)
    with pytest.raises(ValueError, match="> 0"):
        readout.scale_blocks(rot, 2, 0.0)
    with pytest.raises(ValueError, match="blocks"):
        readout.scale_blocks(np.ones((3, 2)), 2, 1.0)
    with pytest.raises(ValueError, match="square"):
        readout.spectral_radius(np.ones((2, 3)))


def test_ridge_recovers_a_linear_map_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    w, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    ridge = readout.Ridge(x, x @ w + b)
    got_w, got_b = ridge.solve(0.0)
    np.testing.assert_allclose(got_w, w, atol=1e-10)
    np.testing.assert_allclose(got_b, b, atol=1e-10)


def test_ridge_solves_the_penalised_normal_equations():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 4)) + 3.0, rng.normal(size=(50, 2))
    alpha = 0.7
    w, b = readout.Ridge(x, y).solve(alpha)
    # [x 1] [w; b] with the bias unpenalised: (A^T A / n + alpha diag(1,..,1,0)) theta = A^T y / n
    a = np.hstack([x, np.ones((50, 1))])
    pen = np.diag([alpha] * 4 + [0.0])
    theta = np.linalg.solve(a.T @ a / 50 + pen, a.T @ y / 50)
    np.testing.assert_allclose(w, theta[:4], atol=1e-10)
    np.testing.assert_allclose(b, theta[4], atol=1e-10)
    # a larger alpha shrinks the weights
    assert np.abs(readout.Ridge(x, y).solve(100.0)[0]).sum() < np.abs(w).sum()


def test_ridge_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="finite"):
        readout.Ridge(np.array([[np.nan]]), np.array([[1.0]]))
    with pytest.raises(ValueError):
        readout.Ridge(np.zeros((0, 2)), np.zeros((0, 1)))
    with pytest.raises(ValueError, match="labels"):
        readout.one_hot(np.array([0, 3]), 3)


def test_readout_separates_separable_classes_and_picks_alpha_on_dev():
    rng = np.random.default_rng(2)
    centres = np.eye(4)[:3] * 3.0

    def blobs(n):
        y = rng.integers(0, 3, size=n)
        return centres[y] + 0.3 * rng.normal(size=(n, 4)), y

    xt, yt = blobs(300)
    xd, yd = blobs(100)
    fit = readout.fit_readout(xt, yt, xd, yd, 3)
    assert fit["dev"] == 1.0 and fit["alpha"] in readout.ALPHAS
    assert readout.accuracy(*blobs(100), fit["W"], fit["b"]) == 1.0
    # every alpha scores 1.0 here: the tie goes to the largest alpha that still scores it
    best = max(a for a, s in fit["dev_by_alpha"] if s == 1.0)
    assert fit["alpha"] == best
    assert len(fit["dev_by_alpha"]) == len(readout.ALPHAS)


def _examples(lengths, seed=0, vocab=30):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = [int(t) for t in rng.integers(1, vocab, size=n)]
        label = int(rng.integers(0, 3))
        tree = build_tree("random", ids, rng=rng).map_labels(lambda _, y=label: y)
        out.append(Example(tuple(ids), tree, label))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_feature_configuration_returns_the_classified_hidden_state(model):
    cfg = _cfg(model)
    params = readout.reservoir_params(cfg, init_params(cfg, 0), 0.9)
    fcfg = readout.feature_config(cfg)
    feats = readout.feature_params(params)
    batch = make_batch(cfg.family, _examples([3, 8, 1]))
    got = reference.logits(fcfg, feats, batch)
    hidden = reference.hidden_states(cfg, params, batch, np.float64)
    want = hidden if cfg.family == "rnn" else hidden[batch.root]
    assert fcfg.num_classes == cfg.hidden and got.shape == (3, cfg.hidden)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.abs(want).max() > 1e-3


def _readout_cell(framework, model, strategy, **kw):
    base = dict(task="listops", batch_size=25, embed_dim=8, hidden=8, threads=1, pool_batches=1,
                repeats=1, warmup_passes=0, latency_samples=1, verify_examples=2,
                max_train_examples=150, train_mode="readout")
    base.update(kw)
    return CellConfig(framework, model, strategy, **base)


@pytest.mark.parametrize("model,strategy", [("lstm", "loop"), ("treelstm", "recursive")])
def test_readout_cell_with_numpy_fits_verified_features(model, strategy):
    rec = run_cell(_readout_cell("numpy", model, strategy))
    assert rec["status"] == "ok", rec.get("traceback") or rec["reason"]
    acc = rec["accuracy"]
    assert acc["mode"] == "readout" and acc["verified"] and acc["verify_max_abs"] < 1e-4
    # the first batch and the longest one of each split (the same batch when it is both)
    assert 3 <= acc["verified_batches"] <= 6 and acc["examples"] == 150 and acc["features"] == 8
    assert 0.0 <= acc["test"] <= 1.0 and 0.0 <= acc["dev"] <= 1.0
    assert acc["train_s"] == pytest.approx(acc["extract_train_s"] + acc["extract_dev_s"] + acc["fit_s"])
    assert acc["alpha"] in readout.ALPHAS and acc["spectral_radius"] == 0.9
    assert dict((a, s) for a, s in acc["dev_by_alpha"])[acc["alpha"]] == acc["dev"]
    assert 0.0 < acc["majority_test"] < 0.5       # ListOps: ten classes


def test_a_readout_feature_mismatch_fails_the_cell(monkeypatch):
    """A planted bug that only the readout's own check can see: features off by 1e-3."""
    real = registry.load

    def load(framework, model):
        cls = real(framework, model)

        class Off(cls):
            def logits(self, prepared):
                out = super().logits(prepared)
                return out + 1e-3 if self.cfg.num_classes == self.cfg.hidden else out

        return Off

    monkeypatch.setattr(registry, "load", load)
    rec = run_cell(_readout_cell("numpy", "elman", "loop"))
    assert rec["status"] == "failed" and rec["reason"].startswith("not equivalent: readout features")
    assert rec["accuracy"]["verified"] is False and "test" not in rec["accuracy"]
    assert rec["verify_max_abs_diff"] < 1e-4      # the model's own check passed


FRAMEWORK_CELLS = [("torch", "elman", "fused"), ("torch", "treelstm", "levels"),
                   ("jax", "rvnn", "levels"),
                   ("tensorflow", "elman", "loop"), ("tensorflow", "treelstm", "levels")]


@pytest.mark.parametrize("framework,model,strategy", FRAMEWORK_CELLS)
def test_readout_features_from_each_framework_are_verified(framework, model, strategy):
    if SELECTED and framework not in SELECTED:
        pytest.skip("%s not in this session's frameworks" % framework)
    ok, detail = registry.probe(framework)
    if not ok:
        if framework in REQUIRED:
            pytest.fail("%s is required here but unavailable: %s" % (framework, detail))
        pytest.skip(detail)
    rec = run_cell(_readout_cell(framework, model, strategy, max_train_examples=60))
    assert rec["status"] == "ok", rec.get("traceback") or rec["reason"]
    assert rec["accuracy"]["verified"] and rec["accuracy"]["verify_max_abs"] < 1e-4


def test_readout_config_keys_labels_and_refusals():
    golden = os.path.join(ROOT, "tests", "data", "golden", "records.jsonl")
    for line in open(golden):
        r = json.loads(line)
        assert CellConfig.from_dict(r["config"]).key() == r["cell_id"]   # full cells keep their keys
    a = CellConfig("torch", "lstm", "fused", train_mode="readout")
    b = CellConfig("torch", "lstm", "fused", train_mode="readout", spectral_radius=0.5)
    full = CellConfig("torch", "lstm", "fused")
    assert len({a.key(), b.key(), full.key()}) == 3
    assert "readout rho0.5" in b.label()
    with pytest.raises(ValueError, match="epochs must be 0"):
        CellConfig("torch", "lstm", "fused", train_mode="readout", epochs=3.0)
    with pytest.raises(ValueError, match="train_mode"):
        CellConfig("torch", "lstm", "fused", train_mode="frozen")
    with pytest.raises(ValueError, match="spectral_radius"):
        CellConfig("torch", "lstm", "fused", train_mode="readout", spectral_radius=0.0)
    cells = preset("readout").cells()
    # frameworks x (RNN models x 4 strategies + tree models x 3) x tasks x seeds
    assert len(cells) == 3 * (2 * 4 + 2 * 3) * 3 * 3
    assert {c.train_mode for c in cells} == {"readout"} and {c.seed for c in cells} == {0, 1, 2}
    assert {c.task for c in cells} == {"sst", "sst2", "listops"}


def _acc_record(fw, model, task, test, seed, mode="full", train_s=100.0, epochs=3.0, rho=0.9):
    strategy = "levels" if model in ("rvnn", "treelstm") else "fused"
    if mode == "readout":
        cfg = CellConfig(fw, model, strategy, task=task, seed=seed, train_mode="readout",
                         spectral_radius=rho)
        acc = {"mode": "readout", "dev": test, "test": test, "train_s": train_s,
               "spectral_radius": rho, "alpha": 0.01, "verified": True, "majority_test": 0.25}
    else:
        cfg = CellConfig(fw, model, strategy, task=task, seed=seed, epochs=epochs)
        acc = {"epochs": epochs, "dev": test, "test": test, "train_s": train_s}
    rec = base_record(cfg)
    rec.update(status="ok", train_samples_per_s=[10.0], infer_samples_per_s=[20.0], accuracy=acc,
               load_avg_1m_at_start=1.0)
    return rec


def test_report_sets_readout_beside_full_training_and_out_of_the_parity_tables():
    pytest.importorskip("pandas")
    from bench.report import accuracy_table, anchors_rows, summarise
    from bench.report.readout import readout_rows
    recs = [_acc_record("torch", "treelstm", "sst", 0.30 + 0.01 * s, s, "readout", train_s=2.0)
            for s in range(3)]
    recs += [_acc_record("torch", "treelstm", "sst", 0.45, s, train_s=60.0) for s in range(2)]
    recs += [_acc_record("torch", "lstm", "sst", 0.40, 0)]      # no readout: no row
    other = _acc_record("torch", "treelstm", "sst", 0.44, 0, train_s=90.0)
    other["machine"] = dict(other["machine"], cpu="Another CPU")
    rows = readout_rows(recs + [other])
    assert len(rows) == 2      # full training on another machine: its own row, named
    assert rows[1][10] == "3 epochs, root loss (other machine: Another CPU)" and rows[1][12] == "90"
    row = rows[0]
    assert row[:3] == ["sst", "treelstm", "torch"]
    assert row[7] == "31.0 ± 1.0" and row[8] == "25.0" and row[9] == "2.0"   # test %, floor, s
    assert row[10] == "3 epochs, root loss" and row[11] == "45.0 ± 0.0" and row[12] == "60"
    assert row[13] == "+14.0" and row[14] == "30x" and row[15] == "3 / 2"
    df = summarise(recs)
    assert set(df["train_mode"]) == {"full", "readout"}
    acc = accuracy_table(df)
    assert len(acc) == 2 and int(acc[acc["model"] == "treelstm"]["seeds"].iloc[0]) == 2
    assert not any("31.0" in r[2] for r in anchors_rows(df))     # readout never judged as parity


def test_other_spectral_radii_go_to_the_sensitivity_table():
    from bench.report.readout import readout_rows, readout_section
    recs = [_acc_record("torch", "rvnn", "listops", 0.30, s, "readout") for s in range(3)]
    recs += [_acc_record("torch", "rvnn", "listops", 0.20, 0, "readout", rho=0.5),
             _acc_record("torch", "rvnn", "listops", 0.35, 0, "readout", rho=1.5),
             _acc_record("torch", "rvnn", "listops", 0.36, 1, "readout", rho=1.5)]
    (row,) = readout_rows(recs)
    assert row[4] == "0.9" and row[7] == "30.0 ± 0.0" and row[15].startswith("3 / ")
    text = readout_section(recs)
    assert "| listops | rvnn | torch | 20.0 / 20.0 | 30.0 / 30.0 | 35.0 / 35.0 |" in text
    bad = _acc_record("torch", "rvnn", "listops", 0.0, 0, "readout", rho=2.0)
    bad["status"] = "failed"
    bad["accuracy"] = {"mode": "readout", "spectral_radius": 2.0, "verified": False,
                       "verify_max_abs": 0.027}
    text = readout_section(recs + [bad])
    assert "| 35.0 / 35.0 | not equivalent (2.7e-02) |" in text
    assert len(readout_rows(recs + [bad])) == 1      # the failed cell is in no accuracy figure


def test_run_selects_readout_cells_by_seed_and_radius():
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "bench", "run", "--preset", "readout", "--frameworks",
                          "torch", "--seeds", "0", "--spectral-radius", "1.2", "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 * 3 and all(line.endswith("readout rho1.2 seed0") for line in lines)
    res = subprocess.run([sys.executable, "-m", "bench", "run", "--preset", "readout", "--epochs", "3",
                          "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "epochs must be 0" in res.stderr and "Traceback" not in res.stderr
