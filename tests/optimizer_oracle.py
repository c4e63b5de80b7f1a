"""The suite's optimiser formulas in float64 NumPy, on reference gradients (a test helper)."""

import numpy as np

from bench import reference
from bench.interface import ADAGRAD, ADAM


def optimizer_steps(cfg, params, batch, steps):
    """Parameters after ``steps`` updates, and per parameter the entries worth comparing.

    Adam moves each entry by about lr * sign(g), so an entry whose gradient is
    at float32 noise level may legitimately go either way; the mask keeps the
    entries with a clearly non-zero gradient (or an exactly zero one) at every step.
    """
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    acc = {k: np.full_like(v, ADAGRAD["initial_accumulator"]) for k, v in p.items()}
    masks = {k: np.ones(v.shape, bool) for k, v in p.items()}
    for t in range(1, steps + 1):
        _, grads = reference.loss_and_grads(cfg, p, batch)
        for k, g in grads.items():
            if cfg.optimizer == "adam":
                m[k] = ADAM["beta1"] * m[k] + (1 - ADAM["beta1"]) * g
                v2[k] = ADAM["beta2"] * v2[k] + (1 - ADAM["beta2"]) * g * g
                m_hat = m[k] / (1 - ADAM["beta1"] ** t)
                v_hat = v2[k] / (1 - ADAM["beta2"] ** t)
                p[k] = p[k] - cfg.lr * m_hat / (np.sqrt(v_hat) + ADAM["eps"])
                masks[k] &= (np.abs(g) > 1e-3 * np.abs(g).max()) | (g == 0)
            elif cfg.optimizer == "adagrad":
                acc[k] = acc[k] + g * g
                p[k] = p[k] - cfg.lr * g / (np.sqrt(acc[k]) + ADAGRAD["eps"])
            else:
                p[k] = p[k] - cfg.lr * g
    return p, masks


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
