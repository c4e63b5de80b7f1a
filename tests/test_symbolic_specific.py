"""PyTensor / Theano specifics: one graph code base for both, and the hand-written optimisers.

Each backend lives in its own virtualenv; a test whose backend does not import
here is skipped.
"""

import importlib

import pytest

from bench.batches import make_batch, make_tree_batch
from bench.params import ModelConfig, init_params
from bench.tasks import load_listops
from tests.optimizer_oracle import check_train_steps

BACKENDS = ["pytensor", "theano"]


def _cls(backend, family):
    pytest.importorskip(backend)
    module = importlib.import_module("impls.%s_impl.%s" % (backend, family))
    return getattr(module, "RNN" if family == "rnn" else "RvNN")


@pytest.fixture(scope="module")
def listops():
    return load_listops(20, 4, 4, seed=3, max_length=30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
@pytest.mark.parametrize("model,strategy", [("elman", "loop"), ("rvnn", "compiled")])
def test_optimizer_steps_match_the_formulas(listops, backend, optimizer, model, strategy):
    """``loop`` updates through the compiled apply function, ``compiled`` inside the train graph."""
    cfg = ModelConfig(model, vocab_size=len(listops.vocab), embed_dim=6, hidden=5,
                      num_classes=10, optimizer=optimizer, lr=0.01)
    params = init_params(cfg, seed=3)
    batch = make_batch(cfg.family, listops.train[:4])
    # load_params resets the optimiser: the same two steps land in the same place
    check_train_steps(_cls(backend, cfg.family)(cfg, strategy, "cpu", 1), cfg, params, batch, 2,
                      again=True)


def test_theano_runs_the_pytensor_code():
    """theano_impl only names its backend; every method is pytensor_impl's."""
    for family in ("rnn", "rvnn"):
        th = importlib.import_module("impls.theano_impl.%s" % family)
        pt = importlib.import_module("impls.pytensor_impl.%s" % family)
        name = "RNN" if family == "rnn" else "RvNN"
        th_cls, pt_cls = getattr(th, name), getattr(pt, name)
        assert issubclass(th_cls, pt_cls)
        own = {k for k in vars(th_cls) if not k.startswith("__")}
        assert own == {"framework", "backend", "not_applicable"}, own
        assert th_cls.backend == "theano" and pt_cls.backend == "pytensor"


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_returns_the_loss_before_the_update(listops, backend):
    cfg = ModelConfig("treelstm", vocab_size=len(listops.vocab), embed_dim=6, hidden=5,
                      num_classes=10, loss_mode="all", lr=0.1)
    impl = _cls(backend, "rvnn")(cfg, "levels", "cpu", 1)
    impl.load_params(init_params(cfg, seed=6))
    ready = impl.prepare(make_tree_batch(listops.train[:3]))
    before, _ = impl.loss_and_grads(ready)
    assert float(impl.train_step(ready)) == pytest.approx(before, abs=1e-6)
    after, _ = impl.loss_and_grads(ready)
    assert after < before
