"""Central finite differences of the float64 reference loss: the gradient oracle of the tests."""

import numpy as np

from bench import reference, verify


def finite_difference_grads(cfg, params, batch, eps=1e-6):
    """d loss / d p for every canonical parameter, one coordinate at a time.

    Refuses a batch on which some parameter's gradient is all zero (an unlabelled
    batch, a parameter the batch never reaches): comparing zeros proves nothing.
    """
    p64 = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    grads = {}
    for name, value in p64.items():
        g = np.zeros_like(value)
        flat, gflat = value.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up = reference.loss(cfg, p64, batch)
            flat[i] = old - eps
            down = reference.loss(cfg, p64, batch)
            flat[i] = old
            gflat[i] = (up - down) / (2 * eps)
        grads[name] = g
    vacuous = verify.zero_gradients(grads)
    assert not vacuous, ("vacuous test: the gradient of %s is all zero on this batch "
                         "(unlabelled trees?)" % ", ".join(vacuous))
    return grads
