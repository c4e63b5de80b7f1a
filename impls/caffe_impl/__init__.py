"""Caffe 1.0 (BVLC, the Debian 11 CPU build) as a framework: RNN and RvNN families.

Caffe has no eager mode and no autograd: a model is a ``Net``, a static list
of layers read from a prototxt, run by ``Net::Forward`` / ``Net::Backward``
in C++. Everything here is therefore built from prototxt text (generated in
``common.Proto``) and driven through pycaffe. Parameters live in Caffe blobs
in the canonical layout (``InnerProduct`` with ``transpose: true`` computes
``x @ W``; ``Embed`` holds ``E`` as ``[V, D]``); every net's layers use the
same master blobs (data and diff), so the per-shape nets below never copy
weights, except Caffe's own ``LSTM`` layer (see ``fused``).

Strategies, as implemented here:

* RNN ``loop``: an unrolled net per sequence length T: one ``Embed`` and one
  input projection for all steps, then per step an ``InnerProduct`` on
  ``h_{t-1}``, ``Eltwise`` sum and the cell's activation layers; every step's
  ``h`` is concatenated and ``BatchReindex`` picks each example's last real
  step (padding steps are computed and never read). Batch size is dynamic
  (Caffe reshapes every layer on each forward), so nets are cached per T.
* RNN ``fused`` (LSTM only): Caffe's ``LSTM`` layer (an unrolled net of
  ``InnerProduct`` + ``LSTMUnit`` layers inside one layer), gate blocks
  ``[i, f, o, g]`` and blobs ``W_xc [4H, D]``, ``b_c [4H]``, ``W_hc [4H, H]``,
  mapped exactly from the canonical ``[i, f, g, o]``; sequence starts via its
  ``cont`` input (0 at t = 0), each example's last real step picked with
  ``BatchReindex``. A Net per T (the layer refuses a new T). The LSTM layer's
  inner net keeps its own weight blobs, so those three are copied in from the
  master when a net is stale (600 KB at H = 150).
* RvNN ``levels``: a net per number of tree levels L: leaves (``Embed`` +
  leaf cell) in one step, then per level one ``BatchReindex`` gather of the
  children ([2n, H] viewed as [n, 2H]), the cell, and ``Concat`` onto the rows
  so far. Level sizes come from the index inputs, so one net serves every
  batch with L levels.
* RvNN ``recursive``: one pycaffe call per node, following each tree in
  post-order from Python: a one-row leaf-cell net and a one-row internal-cell
  net (``force_backward``), an ``Embed`` net for all leaves (one gather) and an
  output/loss net. Training backpropagates node by node from Python, parents
  first, with the node's saved activations put back into the cell net
  before its ``Backward`` (what autograd would keep), so nothing is recomputed.

Net construction (prototxt + ``Net::Init``) happens on the first call that
needs a new shape: it is in the cell's first-call time and its warm-up, never
in the timed passes over an already-seen pool (``info()`` counts the nets and
their build time). The ``recursive`` strategy's four one-row nets have no
batch shape and are built in the constructor, before any timing.

Not applicable (``NOT_APPLICABLE``): Elman ``fused`` and every ``compiled``
cell, for the reasons given there.

Optimisers: Caffe's solvers update the parameters of one ``Net``; here one
model is several nets (one per shape), so the suite's SGD / Adam / AdaGrad
(``bench.interface`` constants, AdaGrad's accumulator starting at 0.1, which
Caffe's ``AdaGradSolver`` cannot do) are applied in NumPy, in place, on the
master blobs' data with their diffs as gradients.

Threads and BLAS: Caffe's CPU math is its BLAS (OpenBLAS 0.3.13 from Debian 11,
unpacked with Caffe) plus single-threaded loops; ``threadpoolctl`` limits
applied at construction and ``info()`` reports the pools. That OpenBLAS does
not know AMD family 19h CPUs (Zen 3/4) and would run its generic SSE3
``Prescott`` kernels there (~3x slower sgemm), so ``common`` asks for its
``Zen`` kernels on such CPUs (``info()["openblas"]`` shows the kernels run).
Caffe's ``InnerProduct`` calls sgemm even for one row, so the one-row cells of
``recursive`` pay OpenBLAS's full GEMM setup per node.

Memory: Caffe allocates every blob of a net for good (no reuse across layers)
and each cached net has its own activations (and its own throwaway ``Embed``
table before the master is swapped in), so peak RSS grows with the number of
distinct lengths / level counts seen; the ``levels`` nets' ``Concat`` of the
rows so far is O(levels x nodes x H) per net.

This module must not import caffe: the registry reads ``NOT_APPLICABLE``
without loading the framework.
"""

from bench.interface import NO_PLAIN

NOT_APPLICABLE = {
    **NO_PLAIN,
    ("elman", "fused"): (
        "Caffe's RNN layer is not a plain Elman RNN: it outputs o_t = tanh(W_ho h_t + b_o), an "
        "extra output layer computed at every step, and exposes h_t itself only as the final "
        "state h_T (expose_hidden), whose top shares data but no diff with the unrolled net, so "
        "no gradient reaches the weights through it (recurrent_layer.cpp)"),
    ("*", "compiled"): (
        "Caffe has no compiler or tracer: a Net is a static layer list interpreted by "
        "Net::Forward/Backward, which is what loop and levels already run"),
}
