"""The optimiser oracle of the tests: bench.reference's float64 update formulas (the ones the
verification gate uses), and the assertions around them."""

import numpy as np

from bench import reference, verify


def optimizer_steps(cfg, params, batch, steps):
    """Parameters after ``steps`` updates, and per parameter the entries worth comparing
    (bench.reference.optimizer_steps, PyTorch's Adam epsilon only). Refuses a batch
    whose reference gradients are all zero: every optimiser would pass on it."""
    _, grads = reference.loss_and_grads(cfg, params, batch)
    vacuous = verify.zero_gradients(grads)
    assert not vacuous, ("vacuous test: the reference gradient of %s is all zero on this batch "
                         "(unlabelled trees?)" % ", ".join(vacuous))
    return reference.optimizer_steps(cfg, params, batch, steps, first_grads=grads)


def assert_matches(got, want, masks, atol=1e-5):
    for k in want:
        assert masks[k].mean() > 0.5, k
        diff = np.abs(got[k].astype(np.float64) - want[k])[masks[k]]
        assert diff.max() < atol, (k, float(diff.max()))


def check_train_steps(impl, cfg, params, batch, steps, again=False):
    """``steps`` train steps of ``impl`` from ``params`` land where the formulas say;
    with ``again``, reloading ``params`` (which resets the optimiser) repeats them exactly."""
    want, masks = optimizer_steps(cfg, params, batch, steps)
    for _ in range(2 if again else 1):
        impl.load_params(params)
        ready = impl.prepare(batch)
        for _ in range(steps):
            impl.train_step(ready)
        assert_matches(impl.export_params(), want, masks)
