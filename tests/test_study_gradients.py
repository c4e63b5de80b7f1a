"""The gradient-flow study: hidden-state gradients of the reference, checked three ways
(central finite differences, PyTorch autograd, the Elman <-> left-branching RvNN mapping),
and the study's bookkeeping (distances, norms, fit, training, command, report)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import reference
from bench import study_gradients as sg
from bench.batches import make_batch, make_seq_batch, make_tree_batch
from bench.params import MODELS, ModelConfig, init_params
from bench.tasks import Dataset, Example, Vocab
from bench.trees import Tree, build_tree, parse_tree
from optimizer_oracle import optimizer_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = [f for f in os.environ.get("BENCH_REQUIRE_FRAMEWORKS", "").split(",") if f]


def _examples(lengths, seed=0, vocab=16, shape="random", classes=3):
    """Labelled examples (every node labelled, so all-node loss has work too)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = [int(t) for t in rng.integers(1, vocab, size=n)]
        tree = build_tree(shape, ids, rng=rng).map_labels(lambda _: int(rng.integers(0, classes)))
        out.append(Example(tuple(ids), tree, tree.label))
    return out


def _cfg(model, **kw):
    base = dict(vocab_size=16, embed_dim=5, hidden=4, num_classes=3)
    base.update(kw)
    return ModelConfig(model, **base)


def _batch(cfg, exs):
    return make_batch(cfg.family, exs)


def _p64(cfg, seed=0, embed_std=0.5):
    return {k: v.astype(np.float64) for k, v in init_params(cfg, seed, embed_std=embed_std).items()}


@pytest.mark.parametrize("model", MODELS)
def test_hidden_grads_match_central_differences(model):
    cfg = _cfg(model)
    p = _p64(cfg)
    batch = _batch(cfg, _examples([2, 5, 3]))      # mixed lengths: padded steps in the RNN batch
    loss, g = reference.hidden_grads(cfg, p, batch)
    assert loss == pytest.approx(reference.loss(cfg, p, batch), abs=1e-12)
    assert np.abs(g).max() > 1e-3, "vacuous: the gradient is all (near) zero"
    off = np.zeros_like(g)
    num = np.zeros_like(g)
    eps = 1e-6
    for i in np.ndindex(g.shape):
        off[i] = eps
        up = reference.loss_with_offsets(cfg, p, batch, off)
        off[i] = -eps
        down = reference.loss_with_offsets(cfg, p, batch, off)
        off[i] = 0.0
        num[i] = (up - down) / (2 * eps)
    assert np.abs(num - g).max() / np.abs(num).max() < 1e-6
    if cfg.family == "rnn":
        padded = np.arange(batch.tokens.shape[1])[None, :] >= batch.lengths[:, None]
        assert padded.any() and np.all(g[padded] == 0)
        # every real step feeds the loss, so none has a zero gradient
        assert np.all(np.abs(g[~padded]).max(axis=-1) > 0)


def _torch_hidden_grads(torch, cfg, params, batch):
    """d loss / d h per step / node by autograd, through torch_impl's own cells (float64)."""
    import torch.nn.functional as F
    from impls.torch_impl import rnn as trnn
    from impls.torch_impl import rvnn as trvnn
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    if cfg.family == "rnn":
        B, T = batch.tokens.shape
        h = torch.zeros(B, cfg.hidden, dtype=torch.float64)
        c = torch.zeros_like(h)
        states = []
        for t in range(T):
            x = p["E"][torch.as_tensor(batch.tokens[:, t], dtype=torch.long)]
            h_new, c_new = trnn.STEPS[cfg.model](x @ p["W_x"] + p["b"], h, c, p["W_h"])
            h_new.retain_grad()
            states.append(h_new)
            live = torch.as_tensor(t < batch.lengths)[:, None]
            h = torch.where(live, h_new, h)
            c = torch.where(live, c_new, c) if c_new is not None else c
        F.cross_entropy(h @ p["W_o"] + p["b_o"], torch.as_tensor(batch.labels, dtype=torch.long)
                        ).backward()
        return np.stack([s.grad.numpy() for s in states], axis=1)
    leaf, node = {"rvnn": (trvnn.rvnn_leaf, trvnn.rvnn_node),
                  "treelstm": (trvnn.treelstm_leaf, trvnn.treelstm_node)}[cfg.model]
    W, b = ("W", "b") if cfg.model == "rvnn" else ("U", "b_U")
    hs, cs = [], []
    for n in range(batch.num_nodes):       # children before parents
        if batch.left[n] < 0:
            h, c = leaf(p["E"][int(batch.token[n])], p["W_leaf"], p["b_leaf"])
        else:
            l, r = int(batch.left[n]), int(batch.right[n])
            h, c = node(torch.cat([hs[l], hs[r]]), cs[l], cs[r], p[W], p[b])
        h.retain_grad()
        hs.append(h)
        cs.append(c)
    roots = torch.stack([hs[int(i)] for i in batch.root])
    F.cross_entropy(roots @ p["W_o"] + p["b_o"],
                    torch.as_tensor(batch.label[batch.root], dtype=torch.long)).backward()
    return np.stack([h.grad.numpy() for h in hs])


@pytest.mark.parametrize("model", MODELS)
def test_hidden_grads_match_torch_autograd(model):
    if "torch" in REQUIRED:
        import torch
    else:
        torch = pytest.importorskip("torch")
    cfg = _cfg(model, hidden=12, embed_dim=7)
    p = _p64(cfg, seed=3)
    batch = _batch(cfg, _examples([9, 1, 4, 13], seed=5))
    _, want = reference.hidden_grads(cfg, p, batch)
    got = _torch_hidden_grads(torch, cfg, p, batch)
    assert np.abs(want).max() > 1e-3
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


def test_left_branching_rvnn_with_elman_weights_has_the_elman_gradients():
    """The seed's claim, for gradients: node t of the mapped chain is h_t, so d loss / d h agrees
    step for step (internal nodes; the leaves are the mapping's input projections)."""
    ecfg = _cfg("elman", vocab_size=30, embed_dim=6, hidden=8)
    ep = _p64(ecfg, seed=2, embed_std=0.1)
    tp, start = reference.elman_as_rvnn(ep)
    tcfg = _cfg("rvnn", vocab_size=31, embed_dim=8, hidden=8)
    seqs = [ex.tokens for ex in _examples([1, 6, 11], seed=1, vocab=30)]
    rnn = make_seq_batch([Example(s, build_tree("left", list(s)), 1) for s in seqs])
    tree = make_tree_batch([Example((start,) + s, build_tree("left", [start] + list(s)).map_labels(
        lambda _: 1), 1) for s in seqs])
    d_rnn, n_rnn, _ = sg.gradient_norms(ecfg, ep, rnn)
    d_tree, n_tree, _ = sg.gradient_norms(tcfg, tp, tree, internal_only=True)
    assert sorted(d_rnn.tolist()) == sorted(d_tree.tolist())
    # both orders are (example, distance) sortable: compare the multisets of (distance, norm)
    a = sorted(zip(d_rnn.tolist(), np.round(n_rnn, 12).tolist()))
    b = sorted(zip(d_tree.tolist(), np.round(n_tree, 12).tolist()))
    assert a == b and min(n_rnn) > 0


def test_distances_from_the_loss():
    tree = parse_tree("(1 (1 (1 a) (1 b)) (1 (1 c) (1 (1 d) (1 e))))").map_tokens(lambda t: ord(t))
    batch = make_tree_batch([Example(tuple(tree.tokens()), tree, 1)])
    depth = sg.tree_depths(batch)
    by_token = {int(batch.token[n]): int(depth[n]) for n in range(batch.num_nodes) if batch.token[n] >= 0}
    assert by_token == {ord("a"): 2, ord("b"): 2, ord("c"): 2, ord("d"): 3, ord("e"): 3}
    assert depth[batch.root[0]] == 0
    seq = make_seq_batch([Example((1, 2, 3), tree, 0), Example((4,), tree, 0)])
    np.testing.assert_array_equal(sg.step_distances(seq), [[2, 1, 0], [0, -1, -1]])


def test_norms_are_per_example_whatever_the_batch():
    for model in ("lstm", "treelstm"):
        cfg = _cfg(model)
        p = _p64(cfg, seed=1)
        exs = _examples([4, 7, 2], seed=2)
        d_all, n_all, _ = sg.gradient_norms(cfg, p, _batch(cfg, exs))
        alone = [sg.gradient_norms(cfg, p, _batch(cfg, [e])) for e in exs]
        d_one = np.concatenate([a[0] for a in alone])
        n_one = np.concatenate([a[1] for a in alone])
        assert sorted(zip(d_all.tolist(), np.round(n_all, 12).tolist())) == \
            sorted(zip(d_one.tolist(), np.round(n_one, 12).tolist()))


def test_unlabelled_examples_and_all_node_loss_are_left_out_or_refused():
    cfg = _cfg("rvnn")
    p = _p64(cfg)
    exs = _examples([3, 4])
    unl = Example(exs[1].tokens, exs[1].tree.map_labels(lambda _: -1), -1)
    d, n, _ = sg.gradient_norms(cfg, p, make_tree_batch([exs[0], unl]))
    assert d.size == 2 * 3 - 1 and n.min() > 0      # only the labelled 3-leaf tree's 5 nodes
    with pytest.raises(ValueError, match="root loss"):
        sg.gradient_norms(_cfg("rvnn", loss_mode="all"), p, make_tree_batch(exs))


def test_row_norms_keep_gradients_far_below_the_square_root_of_the_smallest_float():
    x = np.array([[3e-200, 4e-200], [0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_allclose(sg.row_norms(x), [5e-200, 0.0, 5.0], rtol=1e-14)
    assert np.linalg.norm(x[0]) == 0.0     # what the plain norm would have reported


def test_summaries_and_the_fitted_decay():
    dist = np.repeat(np.arange(6), 4)
    norms = 10.0 ** (-0.5 * dist + np.tile([-0.1, 0.0, 0.0, 0.1], 6))
    norms[-1] = 0.0     # an underflowed state at the largest distance is counted, not logged
    rows = sg.summarise_norms(dist, norms)
    assert [r["count"] for r in rows] == [4] * 6 and rows[-1]["zeros"] == 1
    assert rows[2]["log10_median"] == pytest.approx(-1.0)
    assert rows[0]["log10_q10"] < rows[0]["log10_q25"] <= rows[0]["log10_median"] <= rows[0]["log10_q75"]
    fit = sg.fit_decay(rows)
    assert fit["slope"] == pytest.approx(-0.5, abs=0.01)
    assert fit["max_distance"] == 5 and fit["drop"] == pytest.approx(-2.5, abs=0.05)
    assert sg.fit_decay([dict(rows[0], log10_median=None)])["slope"] is None


def test_the_study_adam_is_the_suite_adam():
    cfg = _cfg("treelstm", optimizer="adam", lr=0.01)
    exs = _examples([3, 5, 2], seed=7)
    params = init_params(cfg, 4)
    want, _ = optimizer_steps(cfg, params, make_tree_batch(exs), 3)
    # one batch of the three examples per step (batch_examples reorders them; the mean loss does not care)
    got, losses = sg.adam_train(cfg, params, exs, steps=3, lr=0.01, batch_size=3, seed=0)
    assert len(losses) == 3 and losses[-1] < losses[0]
    for k in want:
        assert np.abs(got[k] - want[k]).max() < 1e-10, k


def _tiny_dataset():
    rng = np.random.default_rng(0)
    words = ["w%d" % i for i in range(20)]
    vocab = Vocab(words)

    def ex(n):
        ids = [int(t) for t in rng.integers(1, len(vocab), size=n)]
        label = int(rng.integers(0, 3))
        tree = build_tree("random", ids, rng=rng).map_labels(lambda _: label)
        return Example(tuple(ids), tree, label)

    return Dataset("tiny", 3, vocab, {"train": [ex(int(n)) for n in rng.integers(1, 9, 30)],
                                      "dev": [ex(int(n)) for n in rng.integers(1, 9, 10)]})


def test_run_covers_every_model_shape_length_and_phase():
    rows, meta = sg.run(leaves=(4, 8), hidden=6, embed_dim=5, train_steps=3, probe_examples=2,
                        dataset=_tiny_dataset())
    keys = {(r["model"], r["task"], r["shape"], r["leaves"], r["phase"]) for r in rows}
    for phase in ("init", "trained"):
        for n in (4, 8):
            for model, shape in (("elman", "sequence"), ("lstm", "sequence"), ("rvnn", "balanced"),
                                 ("rvnn", "left"), ("rvnn", sg.MAPPED), ("treelstm", "balanced"),
                                 ("treelstm", "left")):
                assert (model, "synth", shape, n, phase) in keys
        for model in MODELS:
            assert (model, "tiny", "sequence" if model in ("elman", "lstm") else "parse", None,
                    phase) in keys
    # the mapped chain reproduces the Elman rows exactly
    by = {(r["model"], r["shape"], r["leaves"], r["phase"], r["distance"]): r for r in rows}
    for n in (4, 8):
        for d in range(n):
            a, b = by[("elman", "sequence", n, "init", d)], by[("rvnn", sg.MAPPED, n, "init", d)]
            assert a["log10_median"] == pytest.approx(b["log10_median"], abs=1e-9)
    # balanced trees stay within log2(n) edges of the loss; chains reach n - 1
    far = {(r["model"], r["shape"], r["leaves"]): r["max_distance"] for r in sg.summary_rows(rows)}
    assert far[("rvnn", "balanced", 8)] == 3 and far[("rvnn", "left", 8)] == 7
    assert far[("elman", "sequence", 8)] == 7
    facts = meta["training"]
    assert facts["treelstm"]["steps"] == 3
    assert [len(facts[m]["recurrent_radius_init"]) for m in MODELS] == [1, 4, 2, 10]
    assert all(0 <= facts[m]["dev_accuracy_" + p] <= 1 for m in MODELS for p in ("init", "trained"))
    assert facts["elman"]["recurrent_radius_init"] != facts["elman"]["recurrent_radius_trained"]


def _bench(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench"] + list(args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_study_command_writes_rows_the_report_draws(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    out = str(tmp_path / "study")
    res = _bench("study", "gradients", "--models", "elman", "rvnn", "--leaves", "8", "--train-steps",
                 "2", "--hidden", "6", "--embed-dim", "5", "--sst-examples", "12",
                 "--probe-examples", "2", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "training 2 Adam steps" in res.stderr and "log10/step" in res.stdout
    rows = sg.read_rows(os.path.join(out, sg.ROWS_FILE))
    assert {r["model"] for r in rows} == {"elman", "rvnn"}
    meta = json.load(open(os.path.join(out, sg.META_FILE)))
    assert meta["train_steps"] == 2 and meta["env"]["git_commit"]
    with open(os.path.join(out, sg.CSV_FILE)) as fh:
        assert fh.readline().strip().split(",") == list(sg.ROW_FIELDS)
        assert len(fh.readlines()) == len(rows)
    rep = str(tmp_path / "report")
    res = _bench("report", out, "--out", rep)
    assert res.returncode == 0, res.stderr
    text = open(os.path.join(rep, "report.md")).read()
    assert "## Gradient flow" in text and "left-branching, Elman's weights" in text
    assert "### The training budget" in text and "2 | " in text
    assert os.path.getsize(os.path.join(rep, "gradient_flow.png")) > 10000


@pytest.mark.parametrize("args,message", [
    (["--leaves", "1"], "--leaves"), (["--leaves", "x"], "whole number"),
    (["--models", "gru"], "unknown model"), (["--train-steps", "-1"], "--train-steps"),
    (["--probe-examples", "0"], "--probe-examples")])
def test_study_command_refuses_bad_input_in_one_line(args, message):
    res = _bench("study", "gradients", *args, timeout=120)
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_unlabelled_trees_elsewhere_are_not_silently_probed():
    """Synthetic probes carry a label at the root (an unlabelled root would have no loss)."""
    seqs = [((1, 2, 3), 2)]
    for shape in sg.SHAPES:
        (ex,) = sg.shaped(seqs, shape)
        assert isinstance(ex.tree, Tree) and ex.tree.label == 2 and ex.tokens == (1, 2, 3)


def test_a_failed_write_keeps_the_earlier_outputs_whole(tmp_path, monkeypatch):
    out = str(tmp_path)
    rows = [{"model": "elman", "task": "synth", "shape": "sequence", "leaves": 8, "phase": "init",
             "distance": 0, "count": 1, "zeros": 0, "log10_median": -1.0}]
    sg.write_outputs(out, rows, {"study": "gradients"})
    before = open(os.path.join(out, sg.ROWS_FILE)).read()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        sg.write_outputs(out, rows * 2, {"study": "gradients"})
    assert open(os.path.join(out, sg.ROWS_FILE)).read() == before
    assert sorted(os.listdir(out)) == sorted([sg.ROWS_FILE, sg.CSV_FILE, sg.META_FILE])


def test_a_damaged_rows_file_is_named_by_the_report(tmp_path):
    pytest.importorskip("pandas")
    path = tmp_path / "study" / sg.ROWS_FILE
    path.parent.mkdir()
    path.write_text('{"model": "elman"}\n{"model": "lst')
    res = _bench("report", str(tmp_path / "study"), "--out", str(tmp_path / "rep"), timeout=120)
    assert res.returncode != 0 and "gradients.jsonl:2: not a JSON row" in res.stderr
    assert "Traceback" not in res.stderr


def test_study_command_says_when_the_disk_fails_it(tmp_path, monkeypatch, capsys):
    from bench import cli, runner

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "stop_on_signals", lambda: {})   # keep pytest's own handlers
    monkeypatch.setattr(sg, "run", lambda **kw: ([], {"study": "gradients"}))
    monkeypatch.setattr(sg, "write_outputs", no_space)
    assert cli.main(["study", "gradients", "--out", str(tmp_path / "s")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
