"""Every registered implementation computes the reference's function.

Parametrised over the registry (restricted to BENCH_FRAMEWORKS when set): a
framework that does not import here is skipped with its reason, unless
BENCH_REQUIRE_FRAMEWORKS names it (the nox sessions do), in which case its
absence fails the run.
"""

import os
from dataclasses import replace

import numpy as np
import pytest

from bench import reference, registry, verify
from bench.batches import make_batch
from bench.interface import NotApplicable, Unavailable
from bench.params import ModelConfig, init_params
from bench.tasks import Example, load_listops, load_sst
from bench.trees import Tree, build_tree
from conftest import SELECTED
from finite_diff import finite_difference_grads

TOL = verify.TOLERANCE
REQUIRED = [f for f in os.environ.get("BENCH_REQUIRE_FRAMEWORKS", "").split(",") if f]
ENTRIES = registry.entries(frameworks=SELECTED)


def _make(fw, model, strategy, cfg):
    # This framework's environment (KERAS_BACKEND, BENCH_DYNET_AUTOBATCH, ...), as a cell would get it.
    os.environ.update(dict(registry.FRAMEWORKS[fw].env))
    ok, why = registry.probe(fw)
    if not ok:
        if fw in REQUIRED:
            pytest.fail("required framework %s is unavailable: %s" % (fw, why))
        pytest.skip(why)
    static = registry.not_applicable(fw, model, strategy, "cpu")
    if static:
        pytest.skip("not applicable: " + static)
    try:
        return registry.load(fw, model)(cfg, strategy, device="cpu", threads=2)
    except NotApplicable as exc:
        pytest.skip("not applicable: %s" % exc)
    except Unavailable as exc:
        pytest.skip("unavailable: %s" % exc)


def _batch(cfg, examples):
    return make_batch(cfg.family, examples)


@pytest.fixture(scope="module")
def listops():
    return load_listops(40, 4, 4, seed=3, max_length=40)


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _modes(model):
    return ("root", "all") if model in ("rvnn", "treelstm") else ("root",)


# -- tiny model: gradients against central finite differences of the float64 reference --

_FD_CACHE = {}


def _finite_difference_grads(cfg, params, batch):
    key = (cfg, id(batch))
    if key not in _FD_CACHE:
        _FD_CACHE[key] = finite_difference_grads(cfg, params, batch)
    return _FD_CACHE[key]


_TINY_BATCHES = {}


@pytest.mark.parametrize("fw,model,strategy", ENTRIES)
def test_tiny_model_against_finite_differences(fw, model, strategy, listops):
    for mode in _modes(model):
        cfg = ModelConfig(model, vocab_size=len(listops.vocab), embed_dim=4, hidden=3,
                          num_classes=10, loss_mode=mode)
        impl = _make(fw, model, strategy, cfg)
        params = init_params(cfg, seed=1, embed_std=0.5)
        batch = _TINY_BATCHES.setdefault(cfg.family, _batch(cfg, listops.train[:3]))
        impl.load_params(params)
        ready = impl.prepare(batch)
        got_logits = impl.to_numpy(impl.logits(ready))
        assert verify.max_abs(got_logits, reference.logits(cfg, params, batch)) <= TOL["logits_abs"]
        fd = _finite_difference_grads(cfg, params, batch)
        # every implementation gives gradients, inference-only ones too (the gate checks them)
        loss, grads = impl.loss_and_grads(ready)
        assert abs(loss - reference.loss(cfg, params, batch)) <= TOL["loss_abs"]
        errs = verify.grad_errors(grads, fd)
        assert max(errs.values()) <= TOL["grad_rel"], (mode, errs)


# -- realistic size: SST, hidden 150 --

@pytest.mark.parametrize("fw,model,strategy", ENTRIES)
def test_sst_logits_loss_grads_and_sgd_step(fw, model, strategy, sst):
    for mode in _modes(model):
        cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=100, hidden=150,
                          num_classes=5, loss_mode=mode, optimizer="sgd", lr=0.5)
        impl = _make(fw, model, strategy, cfg)
        params = init_params(cfg, seed=7)
        batch = _batch(cfg, sst.train[:25])
        impl.load_params(params)
        result = verify.check(impl, cfg, params, batch, keep_ref=True)
        ref_grads = result.pop("ref_grads")
        assert result["ok"], result
        assert not verify.zero_gradients(ref_grads), "vacuous: unlabelled batch"
        if not impl.trains:  # declared: only the NumPy reference
            assert fw == "numpy"
            continue
        # one SGD step lands where the reference update does (the gate's own check)
        step = verify.check_step(impl, cfg, params, batch, ref_grads=ref_grads)
        assert step["ok"] and step["step_compared"] == 1.0, step
        got = impl.export_params()
        for name in params:
            assert got[name].dtype == np.float32 and got[name].shape == params[name].shape
        # and the step changed something (a no-op optimiser would pass the check above only by luck)
        assert max(verify.max_abs(got[k], params[k]) for k in params) > 10 * TOL["param_abs"]


@pytest.mark.parametrize("fw,model,strategy", ENTRIES)
def test_weight_decay_steps_match_the_reference(fw, model, strategy, sst):
    """With a weight decay, one step of each optimiser lands where bench.reference's does:
    the step the cell times (built with the decay) and the gate's probe step at
    verify.DECAY_PROBE (Implementation.set_weight_decay), which then sets the decay back.
    An implementation that refuses a decay must say so at construction."""
    batch = None
    for optimizer, lr in (("sgd", 0.5), ("adam", 1e-3), ("adagrad", 0.05)):
        cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=12, hidden=10,
                          num_classes=5, optimizer=optimizer, lr=lr, weight_decay=0.05)
        impl = _make(fw, model, strategy, cfg)   # skips with the reason if it refuses the decay
        if not impl.trains:
            pytest.skip("inference only: no optimiser step to decay")
        assert impl.weight_decay_refusal is None
        params = init_params(cfg, seed=7)
        batch = batch or _batch(cfg, sst.train[:10])
        impl.load_params(params)
        step = verify.check_step(impl, cfg, params, batch)
        assert step["ok"], (optimizer, step)
        # ... and the decay moved it: the step without one lands elsewhere
        plain, _ = reference.optimizer_steps(replace(cfg, weight_decay=0.0), params, batch, 1)
        got = impl.export_params()
        assert max(verify.max_abs(got[k], plain[k]) for k in params) > 10 * TOL["param_abs"]
        probe = verify.check_decay_step(impl, cfg, params, batch)
        assert probe["ok"] and probe["param_max_abs"] is not None, (optimizer, probe)
        assert impl.cfg.weight_decay == cfg.weight_decay
        # back at the cell's decay, the timed step again
        impl.load_params(params)
        assert verify.check_step(impl, cfg, params, batch)["ok"], optimizer


def test_export_roundtrip_is_exact():
    """load -> export gives back the same float32 arrays, for every available implementation."""
    checked = 0
    for fw, model, strategy in ENTRIES:
        if not registry.probe(fw)[0] or registry.not_applicable(fw, model, strategy, "cpu"):
            continue
        cfg = ModelConfig(model, vocab_size=30, embed_dim=6, hidden=5, num_classes=3)
        try:
            impl = registry.load(fw, model)(cfg, strategy, device="cpu", threads=1)
        except (NotApplicable, Unavailable):
            continue
        params = init_params(cfg, seed=2)
        impl.load_params(params)
        out = impl.export_params()
        assert list(sorted(out)) == list(sorted(params))
        for k in params:
            np.testing.assert_array_equal(out[k], params[k])
        checked += 1
    assert checked >= 2  # at least numpy's two families


# -- padding invariance and degenerate inputs --

def _ex(tree, label=1):
    return Example(tuple(tree.tokens()), tree, label)


def _chain(n, rng):
    return build_tree("left", [int(t) for t in rng.integers(1, 20, size=n)])


@pytest.mark.parametrize("fw,model,strategy", ENTRIES)
def test_padding_does_not_change_results(fw, model, strategy):
    cfg = ModelConfig(model, vocab_size=20, embed_dim=8, hidden=6, num_classes=3)
    impl = _make(fw, model, strategy, cfg)
    params = init_params(cfg, seed=4)
    impl.load_params(params)
    rng = np.random.default_rng(0)
    short = _ex(build_tree("random", [3, 5, 7], rng=rng))
    longer = [_ex(build_tree("random", [int(t) for t in rng.integers(1, 20, size=n)], rng=rng))
              for n in (9, 17, 4)]
    alone = impl.to_numpy(impl.logits(impl.prepare(_batch(cfg, [short]))))
    mixed = impl.to_numpy(impl.logits(impl.prepare(_batch(cfg, longer[:2] + [short] + longer[2:]))))
    assert verify.max_abs(alone[0], mixed[2]) <= 1e-5


@pytest.mark.parametrize("fw,model,strategy", ENTRIES)
def test_degenerate_inputs(fw, model, strategy):
    cfg = ModelConfig(model, vocab_size=20, embed_dim=8, hidden=6, num_classes=3)
    impl = _make(fw, model, strategy, cfg)
    params = init_params(cfg, seed=5)
    impl.load_params(params)
    rng = np.random.default_rng(1)
    one_leaf = _ex(Tree(2, token=4), label=2)
    chain = _ex(_chain(51, rng))       # a left chain of depth 50
    balanced = _ex(build_tree("balanced", [int(t) for t in rng.integers(1, 20, size=1000)]))
    for examples in ([one_leaf], [chain], [balanced], [one_leaf, chain, balanced]):
        batch = _batch(cfg, examples)
        got = impl.to_numpy(impl.logits(impl.prepare(batch)))
        assert got.shape == (len(examples), 3)
        assert verify.max_abs(got, reference.logits(cfg, params, batch)) <= TOL["logits_abs"]


# -- the construction every implementation shares (bench.interface) --

def test_construction_refuses_the_table_then_calls_threads_then_device():
    from bench.interface import Implementation

    calls = []

    class Probe(Implementation):
        family = "rnn"
        not_applicable = {("lstm", "fused"): "no fused LSTM here"}

        def apply_threads(self, threads):
            calls.append(("threads", threads))
            return {"applied": threads}

        def pick_device(self, device):
            calls.append(("device", device))
            return "handle of " + device

    cfg = ModelConfig("elman", vocab_size=10)
    impl = Probe(cfg, "fused", device="cpu", threads=3)
    assert calls == [("threads", 3), ("device", "cpu")]
    assert impl.thread_info == {"applied": 3} and impl.dev == "handle of cpu"
    calls.clear()
    with pytest.raises(NotApplicable, match="no fused LSTM"):
        Probe(replace(cfg, model="lstm"), "fused")
    assert calls == []      # refused before any framework state changes
    plain = type("Plain", (Implementation,), {"family": "rnn"})(cfg, "loop", device="gpu")
    assert plain.thread_info == {} and plain.dev == "gpu"   # the default hooks do nothing
