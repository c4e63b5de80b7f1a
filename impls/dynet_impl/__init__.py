"""DyNet 2.1.2 as a framework: RNN and RvNN families on a dynamic graph per batch.

Every call builds a fresh computation graph (``dy.renew_cg``) and runs it, so
graph construction is part of the timed work, as it is for any DyNet user.

Strategies, as implemented here:

* RNN ``loop``: a Python loop over time steps, batched over the examples with
  ``dy.lookup_batch``; each example's state is picked at its last real token.
* RNN ``fused``: DyNet's own builders: ``SimpleRNNBuilder`` (Elman) and
  ``VanillaLSTMBuilder(ln_lstm=False, forget_bias=0.0)`` (LSTM: one bias, no
  peepholes, gate rows ``[i, f, o, g]``, mapped exactly from our ``[i, f, g, o]``).
  ``CompactVanillaLSTMBuilder`` is not used: it hard-wires a +1 forget-gate bias,
  so our bias could only be loaded as ``b_f - 1``, which does not round-trip
  exactly in float32.
* RvNN ``recursive``: one expression per node, following each tree in
  post-order (what DyNet's tutorials write). With the ``dynet-autobatch``
  registry entry DyNet's on-the-fly autobatching batches these at run time.
* RvNN ``levels``: manual dynamic batching: one batched expression per tree
  height (``concatenate_to_batch`` / ``pick_batch_elems`` gather the children).
* ``compiled``: not applicable (see ``NOT_APPLICABLE``).

Autobatching is chosen by the environment variable ``BENCH_DYNET_AUTOBATCH``
("1" on, otherwise off), read when an implementation is constructed. It is set
in ``dynet_config`` when this package is the first to import DyNet, and passed
to every ``dy.renew_cg(autobatching=...)`` in any case, so a process in which
something else imported DyNet first still gets the requested mode;
``info()`` reports it.

This module must not import dynet: the registry reads ``NOT_APPLICABLE``
without loading the framework.
"""

from bench.interface import NO_PLAIN

NOT_APPLICABLE = {
    **NO_PLAIN,
    ("*", "compiled"): "DyNet has no graph compiler: it builds and interprets a fresh dynamic "
                       "graph for every batch (renew_cg) and offers no static-graph or tracing "
                       "path that could compile the time loop or the level schedule",
}
