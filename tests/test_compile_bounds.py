"""Compiles stay bounded in real cells (issue 19).

A framework that compiles once per shape (JAX's XLA) pays seconds (CPU) to tens of seconds
(GPU) per new batch shape; every batch of a task must map into a few shapes by design.
Quick-preset sizes (SST, batch 25, embedding 100, hidden 150), fewer repeats, and a short
accuracy budget so that training's partial last batch and the dev/test evaluation run too:
each cell compiles at most 4 programs for training and 4 for inference, counted by JAX
itself (``info['compiles']``). torch.compile and TensorFlow's XLA are bounded in their own
test files (test_torch_specific, test_tf_specific) on tiny models.
"""

import pytest

from bench.cell import run_cell
from bench.config import CellConfig
from conftest import SELECTED

pytestmark = pytest.mark.skipif("jax" not in SELECTED, reason="jax not selected")


@pytest.mark.parametrize("model,strategy", [("treelstm", "compiled"), ("treelstm", "levels"),
                                            ("lstm", "compiled")])
def test_quick_cell_compiles_at_most_four_programs_per_phase(model, strategy):
    pytest.importorskip("jax")
    cfg = CellConfig("jax", model, strategy, repeats=2, latency_samples=8, epochs=1.0,
                     max_train_examples=60)
    rec = run_cell(cfg)
    assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
    assert rec["accuracy"]["steps"] == 3       # 25 + 25 + a partial batch of 10
    compiles = rec["info"]["compiles"]
    assert 1 <= compiles["train"] <= 4 and 1 <= compiles["infer"] <= 4, compiles
    # no persistent cache: the first train step's time (compile_s) includes a cold compile
    assert compiles["cache"] == "off" and compiles["cache_hits"] == 0
    assert 0 < compiles["train_s"] and 0 < rec["compile_s"]
