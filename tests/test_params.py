import numpy as np
import pytest

from bench.params import (MODELS, ModelConfig, check_params, init_params, load_params,
                          save_params, schema)


@pytest.mark.parametrize("model", MODELS)
def test_shapes_follow_the_design(model):
    cfg = ModelConfig(model, vocab_size=11, embed_dim=7, hidden=5, num_classes=3)
    p = init_params(cfg, seed=0)
    gates = {"elman": 1, "lstm": 4}
    shapes = {k: v.shape for k, v in p.items()}
    assert shapes["E"] == (11, 7) and shapes["W_o"] == (5, 3) and shapes["b_o"] == (3,)
    if model in gates:
        g = gates[model]
        assert shapes["W_x"] == (7, 5 * g) and shapes["W_h"] == (5, 5 * g) and shapes["b"] == (5 * g,)
    elif model == "rvnn":
        assert shapes["W_leaf"] == (7, 5) and shapes["W"] == (10, 5) and shapes["b"] == (5,)
    else:
        assert shapes["W_leaf"] == (7, 15) and shapes["U"] == (10, 25) and shapes["b_U"] == (25,)
    assert all(v.dtype == np.float32 for v in p.values())
    assert list(p) == list(schema(cfg))


def test_init_is_deterministic_and_bounded():
    cfg = ModelConfig("lstm", vocab_size=50, embed_dim=20, hidden=30)
    a, b, c = init_params(cfg, 1), init_params(cfg, 1), init_params(cfg, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["W_h"], c["W_h"])
    assert np.abs(a["W_x"]).max() <= 1 / np.sqrt(20) and np.abs(a["W_h"]).max() <= 1 / np.sqrt(30)
    assert 0.08 < a["E"].std() < 0.12


def test_save_load_and_schema_check(tmp_path):
    cfg = ModelConfig("treelstm", vocab_size=9, embed_dim=4, hidden=3)
    p = init_params(cfg, 3)
    path = str(tmp_path / "p.npz")
    save_params(path, p)
    q = load_params(path)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    check_params(cfg, q)
    q.pop("U")
    with pytest.raises(ValueError, match="missing"):
        check_params(cfg, q)
    q["U"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="shape"):
        check_params(cfg, q)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        ModelConfig("gru", vocab_size=3)
    with pytest.raises(ValueError):
        ModelConfig("lstm", vocab_size=3, loss_mode="all")
    with pytest.raises(ValueError):
        ModelConfig("rvnn", vocab_size=3, optimizer="rmsprop")
