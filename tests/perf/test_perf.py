"""pytest-benchmark: one train-step and one inference benchmark per registered implementation.

Small fixed shapes (SST, batch 8, hidden 32) so the whole file runs in minutes.
This is the per-commit gate (``nox -s perf``, compared against a saved run);
the runner and ``bench compare`` stay the tool across frameworks and releases.
In ``nox -s tests`` it runs with ``--benchmark-disable``: each body once, as a
check that every benchmark still works.
"""

import os

import pytest

pytest.importorskip("pytest_benchmark")

from bench import registry  # noqa: E402
from bench.batches import batch_stream  # noqa: E402
from bench.interface import NotApplicable, Unavailable  # noqa: E402
from bench.params import ModelConfig, init_params  # noqa: E402
from bench.tasks import load_sst  # noqa: E402
from conftest import SELECTED  # noqa: E402


@pytest.fixture(scope="module")
def sst():
    return load_sst(5)


def _impl(fw, model, strategy, sst):
    os.environ.update(dict(registry.FRAMEWORKS[fw].env))
    ok, why = registry.probe(fw)
    if not ok:
        pytest.skip(why)
    static = registry.not_applicable(fw, model, strategy, "cpu")
    if static:
        pytest.skip(static)
    cfg = ModelConfig(model, vocab_size=len(sst.vocab), embed_dim=32, hidden=32,
                      num_classes=5, optimizer="adam", lr=1e-3)
    try:
        impl = registry.load(fw, model)(cfg, strategy, device="cpu", threads=2)
    except (NotApplicable, Unavailable) as exc:
        pytest.skip(str(exc))
    impl.load_params(init_params(cfg, 0))
    batch = batch_stream(sst.train[:64], cfg.family, 8, seed=0, bucket=True)[0]
    ready = impl.prepare(batch)
    return impl, ready


@pytest.mark.parametrize("fw,model,strategy", registry.entries(frameworks=SELECTED))
def test_train_step(benchmark, fw, model, strategy, sst):
    impl, ready = _impl(fw, model, strategy, sst)
    if not impl.trains:               # declared; any other NotImplementedError fails
        pytest.skip("inference only")
    impl.train_step(ready)            # compile / warm up outside the measurement
    impl.sync()

    def step():
        loss = impl.train_step(ready)
        impl.sync()
        return loss

    loss = benchmark(step)
    assert float(impl.to_numpy(loss)) > 0


@pytest.mark.parametrize("fw,model,strategy", registry.entries(frameworks=SELECTED))
def test_inference(benchmark, fw, model, strategy, sst):
    impl, ready = _impl(fw, model, strategy, sst)
    impl.logits(ready)
    impl.sync()

    def infer():
        out = impl.logits(ready)
        impl.sync()
        return out

    out = impl.to_numpy(benchmark(infer))
    assert out.shape == (8, 5)
