"""PyTorch: the RNN family (``rnn.py``) and the RvNN family (``rvnn.py``).

Strategies, all on the canonical float32 parameters of ``bench.params``:

* RNN ``loop``: eager Python loop over time steps; ``fused``: ``nn.RNN`` /
  ``nn.LSTM`` on a ``PackedSequence`` (oneDNN/native on CPU, cuDNN on GPU);
  ``compiled``: the loop's step, unrolled over chunks of time steps, under
  ``torch.compile``.
* RvNN ``recursive``: one call per node; ``levels``: one gather, matmul and
  write per tree height across the batch; ``compiled``: the packed static form
  (``TreeBatch.padded_packed``) under ``torch.compile``.

Every (model, strategy) of both families is expressible in PyTorch, so the
table of static exclusions is empty. This module must not import torch: the
registry reads it to list cells without loading the framework.
"""

NOT_APPLICABLE = {}
