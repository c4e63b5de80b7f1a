"""Caffe-only checks: what the generic equivalence tests cannot see.

* The fused LSTM's blobs are Caffe's [i, f, o, g] layout of the canonical
  [i, f, g, o] weights (shapes, block order, round trip), and Caffe's LSTM
  layer with them agrees with the hand-unrolled ``loop`` net when biases are
  large (small biases would hide a swapped gate).
* ``cont`` is 0 exactly at each sequence start and the last real step is the
  one selected; a sequence alone and padded inside a longer batch agree.
* Every net of an implementation uses the same master blobs: a training step
  taken through the net of one length is seen by the net of another length
  without copying, and nets are cached per length / level count (batch size
  free).
* The optimisers follow the suite's formulas (AdaGrad from the 0.1
  accumulator, Adam with bias-corrected eps) over several steps.
* The recursive strategy's node-by-node backward (saved activations put
  back) gives the same gradients as the levels net.
* The not-applicable reasons hold: Caffe's RNN layer with ``expose_hidden``
  passes no gradient from its final state ``h_T`` to any weight.
* Threads: Caffe's OpenBLAS pool is capped at the requested count.
"""

import numpy as np
import pytest

from bench import reference
from bench.batches import make_seq_batch, make_tree_batch
from bench.interface import NotApplicable
from bench.params import ModelConfig, init_params
from bench.tasks import load_listops
from optimizer_oracle import check_train_steps

pytest.importorskip("caffe")

from impls.caffe_impl import common  # noqa: E402
from impls.caffe_impl.rnn import (RNN, fused_from_canonical,  # noqa: E402
                                  fused_to_canonical)
from impls.caffe_impl.rvnn import RvNN  # noqa: E402

DATA = load_listops(12, 4, 4, seed=3, max_length=30)


def _cfg(model, **kw):
    return ModelConfig(model, vocab_size=len(DATA.vocab), embed_dim=6, hidden=4, num_classes=10,
                       **kw)


@pytest.fixture(scope="module")
def examples():
    return DATA.train[:6]


def test_fused_blobs_are_caffes_ifog_layout():
    cfg = _cfg("lstm")
    params = init_params(cfg, seed=0)
    impl = RNN(cfg, "fused")
    impl.load_params(params)
    H, D = cfg.hidden, cfg.embed_dim
    c = fused_from_canonical(params)
    assert c["W_xc"].shape == (4 * H, D) and c["W_hc"].shape == (4 * H, H)
    blocks = np.split(params["W_x"], 4, axis=1)          # canonical i, f, g, o
    for k, canon in enumerate((0, 1, 3, 2)):              # Caffe i, f, o, g
        np.testing.assert_array_equal(c["W_xc"][k * H:(k + 1) * H], blocks[canon].T)
    back = fused_to_canonical(c)
    for k in ("W_x", "W_h", "b"):
        np.testing.assert_array_equal(back[k], params[k])
    # and the layer inside a built net holds exactly these blobs, in this order
    ready = impl.prepare(make_seq_batch(DATA.train[:2]))
    impl.logits(ready)
    blobs = impl.nets[ready.steps].net.params["lstm"]
    assert [tuple(b.shape) for b in blobs] == [(4 * H, D), (4 * H,), (4 * H, H)]
    for blob, k in zip(blobs, ("W_xc", "b_c", "W_hc")):
        np.testing.assert_array_equal(blob.data, c[k])


def test_fused_agrees_with_loop_when_gates_differ(examples):
    cfg = _cfg("lstm")
    params = init_params(cfg, seed=2)
    H = cfg.hidden
    params["b"] = params["b"] + np.repeat(np.float32([2.0, -1.0, 0.5, -2.0]), H)  # i, f, g, o
    batch = make_seq_batch(examples)
    want = reference.logits(cfg, params, batch)
    outs = {}
    for strategy in ("loop", "fused"):
        impl = RNN(cfg, strategy)
        impl.load_params(params)
        outs[strategy] = impl.logits(impl.prepare(batch))
        assert np.max(np.abs(outs[strategy] - want)) < 1e-5, strategy
    assert np.max(np.abs(outs["loop"] - outs["fused"])) < 1e-5


def test_cont_marks_starts_and_the_last_real_step_is_read(examples):
    cfg = _cfg("lstm")
    impl = RNN(cfg, "fused")
    params = init_params(cfg, seed=1)
    impl.load_params(params)
    batch = make_seq_batch(examples)
    ready = impl.prepare(batch)
    T, B = ready.tokens.shape
    assert np.all(ready.cont[0] == 0) and np.all(ready.cont[1:] == 1)
    np.testing.assert_array_equal(ready.sel, (batch.lengths - 1) * B + np.arange(B))
    short = min(range(B), key=lambda b: batch.lengths[b])
    assert batch.lengths[short] < T, "the check needs a padded example"
    alone = impl.logits(impl.prepare(make_seq_batch([examples[short]])))
    mixed = impl.logits(ready)
    assert np.max(np.abs(alone[0] - mixed[short])) < 1e-6


def test_nets_share_master_blobs_across_lengths(examples):
    cfg = _cfg("elman", optimizer="sgd", lr=0.5)
    impl = RNN(cfg, "loop")
    params = init_params(cfg, seed=3)
    impl.load_params(params)
    by_len = {}
    for e in DATA.train:
        by_len.setdefault(len(e.tokens), []).append(e)
    (la, ea), (lb, eb) = sorted(by_len.items())[:2]
    a, b = make_seq_batch(ea[:1]), make_seq_batch(eb[:2])
    impl.logits(impl.prepare(b))                       # build the T = lb net first
    impl.train_step(impl.prepare(a))                   # a step through the T = la net
    stepped = impl.export_params()
    assert np.max(np.abs(stepped["W_x"] - params["W_x"])) > 1e-4
    got = impl.logits(impl.prepare(b))
    np.testing.assert_allclose(got, reference.logits(cfg, stepped, b), atol=1e-5)
    # one net per length; a new batch size with a known length builds nothing
    built = impl.nets_built
    impl.logits(impl.prepare(make_seq_batch(eb[:1])))
    assert impl.nets_built == built and sorted(impl.nets) == sorted({la, lb})


def test_levels_nets_are_cached_per_level_count(examples):
    cfg = _cfg("treelstm")
    impl = RvNN(cfg, "levels")
    impl.load_params(init_params(cfg, seed=0))
    batches = [make_tree_batch(examples[i:i + 2]) for i in range(0, 6, 2)]
    for batch in batches + batches:
        impl.logits(impl.prepare(batch))
    assert sorted(impl.nets) == sorted({b.num_levels for b in batches})


@pytest.mark.parametrize("model,strategy,optimizer,lr", [
    ("lstm", "fused", "adam", 0.01),
    ("elman", "loop", "adagrad", 0.1),
    ("treelstm", "recursive", "adagrad", 0.1),
    ("rvnn", "levels", "adam", 0.01),
])
def test_optimizers_follow_the_suite_formulas(examples, model, strategy, optimizer, lr):
    cfg = _cfg(model, optimizer=optimizer, lr=lr)
    params = init_params(cfg, seed=4)
    family = RNN if model in ("elman", "lstm") else RvNN
    batch = (make_seq_batch if family is RNN else make_tree_batch)(examples)
    check_train_steps(family(cfg, strategy), cfg, params, batch, 3)


@pytest.mark.parametrize("model", ["rvnn", "treelstm"])
@pytest.mark.parametrize("mode", ["root", "all"])
def test_recursive_backward_matches_levels(examples, model, mode):
    cfg = _cfg(model, loss_mode=mode)
    params = init_params(cfg, seed=6, embed_std=0.5)
    batch = make_tree_batch(examples)
    got = {}
    for strategy in ("recursive", "levels"):
        impl = RvNN(cfg, strategy)
        impl.load_params(params)
        ready = impl.prepare(batch)
        impl.loss_and_grads(ready)                     # a second call must not accumulate
        got[strategy] = impl.loss_and_grads(ready)
    assert abs(got["recursive"][0] - got["levels"][0]) < 1e-6
    for k, g in got["levels"][1].items():
        np.testing.assert_allclose(got["recursive"][1][k], g, atol=1e-6, err_msg=k)


def test_not_applicable_cells_say_why():
    with pytest.raises(NotApplicable, match="W_ho"):
        RNN(_cfg("elman"), "fused")
    for cls, model in ((RNN, "lstm"), (RvNN, "treelstm")):
        with pytest.raises(NotApplicable, match="no compiler"):
            cls(_cfg(model), "compiled")


def test_rnn_layer_exposed_final_state_carries_no_gradient():
    """Why Elman ``fused`` is not applicable: a loss on ``h_T`` leaves every RNN weight's diff 0."""
    p = common.Proto("rnn_expose")
    x = p.input("x", (3, 2, 4))
    cont = p.input("cont", (3, 2))
    h0 = p.input("h0", (1, 2, 5))
    p.add("RNN", "rnn", [x, cont, h0], ["o", "hT"],
          body="recurrent_param { num_output: 5 expose_hidden: true "
               "weight_filler { type: \"uniform\" min: -0.5 max: 0.5 } }")
    p.silence("o")
    p.add("Reduction", "lossT", ["hT"], ["loss"], loss_weights=(1,),
          body="reduction_param { operation: SUMSQ }")
    net = common.net_from_text(p.text())
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal((3, 2, 4))
    net.blobs["cont"].data[...] = np.float32([[0, 0], [1, 1], [1, 1]])
    last = len(net.layers) - 1
    loss = net._forward(0, last)
    assert loss > 0
    names = ["W_xh", "b_h", "W_hh", "W_ho", "b_o"]
    blobs = list(net.params["rnn"])
    assert len(blobs) == len(names)
    for blob in blobs:
        blob.diff[...] = 0.0
    net._backward(last, 0)
    for name, blob in zip(names, blobs):
        assert not np.any(blob.diff), name
    # yet the loss does depend on the recurrent weights
    blobs[2].data[...] += 0.1
    assert abs(net._forward(0, last) - loss) > 1e-3


def test_threads_cap_caffes_openblas():
    impl = RNN(_cfg("elman"), "loop", threads=1)
    pools = [p for p in impl.info()["blas_pools"] if p["with_caffe"]]
    assert pools, "Caffe's own BLAS should be among the loaded pools"
    assert all(p["threads"] == 1 for p in pools)
    assert impl.info()["threads"]["requested"] == 1


def test_openblas_kernels_fit_this_cpu_and_the_choice_does_not_leak():
    """In a fresh process (here caffe may have been imported before the package could choose)."""
    import json
    import os
    import subprocess
    import sys
    code = ("import json, os, impls.caffe_impl.common as c; "
            "print(json.dumps([c._openblas_coretype(), c.openblas_info(), "
            "os.environ.get('OPENBLAS_CORETYPE')]))")
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    wanted, info, left = json.loads(out.stdout.strip().splitlines()[-1])
    assert left is None                      # not inherited by processes started later
    assert info["corename"] != "Prescott" or wanted is None
    if info["coretype_requested"]:
        assert info["corename"] == info["coretype_requested"]
