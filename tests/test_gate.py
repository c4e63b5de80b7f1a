"""The verification gate (bench.verify, and its place in bench.cell), with NumPy stand-ins.

Fake implementations built on the NumPy reference plant one bug each; the gate
must catch it where the old gate (a few pool examples, root loss only, no
optimiser step) could not. The mutation suite (tests/mutants) does the same
with the real torch, JAX and TensorFlow implementations.
"""

from dataclasses import replace

import numpy as np
import pytest

from bench import reference, verify
from bench.batches import batch_examples, make_seq_batch, make_tree_batch
from bench.config import CellConfig
from bench.interface import ADAGRAD, ADAM, Implementation, NotApplicable
from bench.params import ModelConfig, init_params
from bench.tasks import load_sst
from impls.numpy_impl.rnn import RNN as NumpyRNN
from impls.numpy_impl.rvnn import RvNN as NumpyRvNN


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


# --- which examples the gate checks ---

def test_gate_examples_reach_the_pool_extremes(sst):
    pool = [e for g in batch_examples(sst.train, 25, seed=0, bucket=True)[:5] for e in g]
    picked = verify.gate_examples(pool, 25)
    assert len(picked) == 25 and len({id(e) for e in picked}) == 25
    lengths = [len(e.tokens) for e in picked]
    assert max(lengths) == max(len(e.tokens) for e in pool)
    assert min(lengths) == min(len(e.tokens) for e in pool)
    assert max(e.tree.height for e in picked) == max(e.tree.height for e in pool)
    assert min(lengths) * 4 <= max(lengths)          # padding is exercised
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)
    assert verify.gate_examples(pool, 25) == picked   # deterministic
    assert verify.gate_examples(pool[:5], 8) == verify.gate_examples(pool[:5], 5)
    assert len(verify.gate_examples(pool[:5], 8)) == 5


def test_gate_size_follows_the_batch_size_within_bounds():
    assert verify.gate_size(25) == 25
    assert verify.gate_size(1) == verify.gate_size(4) == verify.GATE_MIN == 8
    assert verify.gate_size(400) == verify.GATE_MAX
    assert verify.gate_size(8, at_least=50) == 50


def test_describe_reports_lengths_heights_and_mode(sst):
    exs = sst.train[:6]
    tree = verify.describe(make_tree_batch(exs), "all")
    seq = verify.describe(make_seq_batch(exs), "root")
    assert tree["max_length"] == seq["max_length"] == max(len(e.tokens) for e in exs)
    assert tree["min_length"] == min(len(e.tokens) for e in exs)
    assert tree["max_height"] == max(e.tree.height for e in exs) and seq["max_height"] is None
    assert (tree["loss_mode"], tree["examples"]) == ("all", 6)


# --- vacuous comparisons are refused ---

def test_unlabelled_batches_are_refused_as_vacuous(sst):
    cfg = ModelConfig("treelstm", vocab_size=len(sst.vocab), embed_dim=6, hidden=5)
    params = init_params(cfg, 0)
    unlabelled = [type(e)(e.tokens, e.tree.map_labels(lambda _: -1), -1) for e in sst.train[:3]]
    batch = make_tree_batch(unlabelled)
    impl = NumpyRvNN(cfg, "recursive")
    impl.load_params(params)
    res = verify.check(impl, cfg, params, batch)
    assert not res["ok"] and "vacuous" in res["problems"][0]
    _, grads = reference.loss_and_grads(cfg, params, batch)
    with pytest.raises(ValueError, match="vacuous"):
        verify.grad_errors(grads, grads)
    assert verify.zero_gradients(grads) == sorted(grads)


# --- the optimiser step ---

class Trainable:
    """Mixin: the NumPy reference with an optimiser of its own, in float32, with switches
    for the bugs the step check must catch (and the one legitimate variant it must accept)."""

    trains = True
    weight_decay_refusal = None
    lr_scale = 1.0
    decay_scale = 1.0          # 0: the weight decay dropped; 0.5: the loss term's 1/2 twice
    decay_after_scaling = False  # theta -= lr * wd * theta beside the step (decoupled, AdamW)
    eps_on_raw_root = False    # Keras' Adam epsilon placement: legitimate
    no_bias_correction = False
    frozen = False

    def load_params(self, params):
        super().load_params(params)
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.acc = {k: np.full_like(v, ADAGRAD["initial_accumulator"]) for k, v in self.params.items()}

    def train_step(self, prepared):
        loss, grads = self.loss_and_grads(prepared)
        if self.frozen:
            return loss
        self.t += 1
        lr, t = np.float32(self.cfg.lr * self.lr_scale), self.t
        wd = np.float32(self.cfg.weight_decay * self.decay_scale)
        for k, g in grads.items():
            if wd and not self.decay_after_scaling:
                g = g + wd * self.params[k]
            if self.cfg.optimizer == "sgd":
                step = lr * g
            elif self.cfg.optimizer == "adagrad":
                self.acc[k] += g * g
                step = lr * g / (np.sqrt(self.acc[k]) + np.float32(ADAGRAD["eps"]))
            else:
                b1, b2, eps = ADAM["beta1"], ADAM["beta2"], ADAM["eps"]
                self.m[k] = b1 * self.m[k] + (1 - b1) * g
                self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
                m_hat = self.m[k] if self.no_bias_correction else self.m[k] / (1 - b1 ** t)
                if self.eps_on_raw_root:
                    step = lr * np.sqrt(1 - b2 ** t) * m_hat / (np.sqrt(self.v[k]) + eps)
                else:
                    step = lr * m_hat / (np.sqrt(self.v[k] / (1 - b2 ** t)) + eps)
            if wd and self.decay_after_scaling:
                step = step + lr * wd * self.params[k]
            self.params[k] = (self.params[k] - step).astype(np.float32)
        return loss


def _trainable(base, **switches):
    return type("Fake", (Trainable, base), switches)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 1e-3), ("adagrad", 0.05)])
@pytest.mark.parametrize("model", ["lstm", "treelstm"])
def test_step_check_accepts_correct_optimisers_and_catches_wrong_ones(sst, optimizer, lr, model):
    cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=20, hidden=16,
                      optimizer=optimizer, lr=lr)
    params = init_params(cfg, 3)
    base = NumpyRNN if cfg.family == "rnn" else NumpyRvNN
    strategy = "loop" if cfg.family == "rnn" else "recursive"
    pool = [e for g in batch_examples(sst.train[:200], 25, seed=0, bucket=True) for e in g]
    make = make_seq_batch if cfg.family == "rnn" else make_tree_batch
    batch = make(verify.gate_examples(pool, 25))

    def step(**switches):
        impl = _trainable(base, **switches)(cfg, strategy)
        impl.load_params(params)
        return verify.check_step(impl, cfg, params, batch)

    good = step()
    assert good["ok"], good
    assert good["step_compared"] > (0.8 if optimizer == "adam" else 0.999)
    if optimizer == "adam":
        keras_eps = step(eps_on_raw_root=True)
        assert keras_eps["ok"], keras_eps
        bad = step(no_bias_correction=True)
        assert not bad["ok"] and "adam step" in bad["problems"][0]
    for bug in ({"lr_scale": 2.0}, {"lr_scale": 1.05}, {"frozen": True}):
        res = step(**bug)
        assert not res["ok"], (bug, res)


# --- the gate inside a cell ---

def _cell(model, **kw):
    strategy = "loop" if model in ("elman", "lstm") else "recursive"
    base = dict(batch_size=8, embed_dim=8, hidden=8, pool_batches=2, repeats=1, warmup_passes=0,
                latency_samples=1)
    base.update(kw)
    return CellConfig("numpy", model, strategy, **base)


def _run(monkeypatch, cls, cfg):
    from bench import cell
    monkeypatch.setattr(cell.registry, "load", lambda fw, model: cls)
    return cell.run_cell(cfg)


def test_numpy_cell_records_what_the_gate_covered(monkeypatch, sst):
    from bench import cell
    cfg = _cell("treelstm")
    rec = cell.run_cell(cfg)
    assert rec["status"] == "ok", rec["reason"]
    assert "inference only" in rec["reason"]
    assert rec["verify_s"] > 0 and rec["verify_param_max_abs"] is None
    groups = batch_examples(sst.train, 8, seed=0, bucket=True, drop_last=True)[:2]
    pool = [e for g in groups for e in g]
    names = [(b["name"], b["loss_mode"]) for b in rec["verify_batches"]]
    assert names == [("extremes", "root"), ("unbucketed", "root"), ("pool", "root"),
                     ("extremes", "all")]
    ext = rec["verify_batches"][0]
    assert ext["examples"] == 8
    assert ext["max_length"] == max(len(e.tokens) for e in pool)
    assert ext["max_height"] == max(e.tree.height for e in pool)
    assert ext["min_length"] == min(len(e.tokens) for e in pool)
    first = batch_examples(sst.train, 8, seed=0)[0]
    assert rec["verify_batches"][1]["max_length"] == max(len(e.tokens) for e in first)


def test_a_trainable_cell_checks_its_optimiser_step(monkeypatch):
    rec = _run(monkeypatch, _trainable(NumpyRNN), _cell("lstm"))
    assert rec["status"] == "ok", rec["reason"]
    assert rec["verify_param_max_abs"] < 1e-6 and rec["train_samples_per_s"]
    assert rec["verify_batches"][0]["checks"][-2:] == [
        "adam step", "adam step (weight decay %g)" % verify.DECAY_PROBE]
    rec = _run(monkeypatch, _trainable(NumpyRNN, lr_scale=2.0), _cell("lstm"))
    assert rec["status"] == "failed" and "adam step" in rec["reason"], rec["reason"]
    assert rec["train_samples_per_s"] == [] and rec["compile_s"] is None


def test_a_declared_trainer_without_a_step_fails_instead_of_going_inference_only(monkeypatch):
    class Liar(NumpyRNN):
        trains = True   # declared, but train_step still raises NotImplementedError

    rec = _run(monkeypatch, Liar, _cell("elman"))
    assert rec["status"] == "failed" and rec["reason"].startswith("NotImplementedError"), rec
    assert rec["infer_samples_per_s"] == []


def test_all_node_loss_is_gated_in_a_root_loss_cell(monkeypatch):
    class PerTree(NumpyRvNN):
        """Divides the all-node loss by the number of trees (the issue's planted bug)."""

        def loss_and_grads(self, prepared):
            loss, grads = super().loss_and_grads(prepared)
            if self.cfg.loss_mode == "root":
                return loss, grads
            scale = np.float32((prepared.label >= 0).sum() / prepared.size)
            return loss * scale, {k: g * scale for k, g in grads.items()}

    rec = _run(monkeypatch, PerTree, _cell("treelstm"))
    assert rec["status"] == "failed", rec["reason"]
    assert rec["reason"].startswith("not equivalent: extremes (all loss): loss differs")


def test_order_bugs_that_bucketed_batches_hide_are_caught(monkeypatch, sst):
    class SortsRows(NumpyRNN):
        """Returns logits sorted by length (longest first), as a compiled RNN that re-joins its
        rows wrongly would: invisible on a batch that is already in that order."""

        def logits(self, prepared):
            out = super().logits(prepared)
            return out[np.argsort(-prepared.lengths, kind="stable")]

    sorted_batch = make_seq_batch(sorted(sst.train[:8], key=lambda e: -len(e.tokens)))
    cfg = ModelConfig("elman", vocab_size=len(sst.vocab), embed_dim=8, hidden=8)
    impl = SortsRows(cfg, "loop")
    params = init_params(cfg, 0)
    impl.load_params(params)
    assert verify.check(impl, cfg, params, sorted_batch)["ok"]   # what a bucketed batch shows
    rec = _run(monkeypatch, SortsRows, _cell("elman"))
    assert rec["status"] == "failed" and "logits differ" in rec["reason"], rec["reason"]


# --- weight decay in the optimiser step ---

@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 1e-3), ("adagrad", 0.05)])
def test_gate_checks_the_decay_step_at_the_cells_decay_and_at_the_probe(sst, optimizer, lr):
    """A step that drops the decay, halves it or decouples it (Adam, Adagrad) passes a plain step check
    (a cell without decay) but not the gate, which steps again at DECAY_PROBE."""
    cfg = ModelConfig("lstm", vocab_size=len(sst.vocab), embed_dim=20, hidden=16,
                      optimizer=optimizer, lr=lr)
    params = init_params(cfg, 3)
    batch = make_seq_batch(sst.train[:12])

    def gate(model_cfg, **switches):
        impl = _trainable(NumpyRNN, **switches)(model_cfg, "loop")
        impl.load_params(params)
        out = verify.gate(impl, model_cfg, params, [("b", batch)])
        assert impl.cfg.weight_decay == model_cfg.weight_decay   # set back after the probe
        return out

    good = gate(cfg)
    assert good["ok"], good["problems"]
    assert good["batches"][0]["checks"][-2:] == [
        "%s step" % optimizer, "%s step (weight decay %g)" % (optimizer, verify.DECAY_PROBE)]
    decayed = replace(cfg, weight_decay=0.01)
    res = gate(decayed)
    assert res["ok"], res["problems"]
    assert "%s step (weight decay 0.01)" % optimizer in res["batches"][0]["checks"]
    bugs = [{"decay_scale": 0.0}, {"decay_scale": 0.5}]
    if optimizer != "sgd":   # for SGD, decoupled decay is the same update
        bugs.append({"decay_after_scaling": True})
    for bug in bugs:
        impl = _trainable(NumpyRNN, **bug)(cfg, "loop")
        impl.load_params(params)
        assert verify.check_step(impl, cfg, params, batch)["ok"]   # no decay: invisible
        for model_cfg in (cfg, decayed):
            res = gate(model_cfg, **bug)
            assert not res["ok"], (bug, model_cfg.weight_decay)
            assert any("weight decay %g" % verify.DECAY_PROBE in p for p in res["problems"])


def test_an_implementation_without_decay_refuses_it_and_its_gate_says_so(sst):
    cfg = ModelConfig("lstm", vocab_size=len(sst.vocab), embed_dim=8, hidden=8, optimizer="adam",
                      lr=1e-3)
    # the interface's default: an implementation that does not say it applies a decay refuses it
    refuses = type("NoDecay", (Trainable, NumpyRNN),
                   {"weight_decay_refusal": Implementation.weight_decay_refusal})
    with pytest.raises(NotApplicable, match="weight decay 0.01: .*no weight decay"):
        refuses(replace(cfg, weight_decay=0.01), "loop")
    params = init_params(cfg, 0)
    impl = refuses(cfg, "loop")
    impl.load_params(params)
    res = verify.gate(impl, cfg, params, [("b", make_seq_batch(sst.train[:8]))])
    assert res["ok"] and res["weight_decay"].startswith("not checked: weight decay 0.5")
    assert res["batches"][0]["checks"][-1] == "adam step"
    # the inference-only reference takes any decay: it has no optimiser step to apply it in
    NumpyRNN(replace(cfg, weight_decay=0.01), "loop")
