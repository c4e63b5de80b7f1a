"""PyTensor (Theano's successor) as a framework: RNN and RvNN families.

The graph code here is written once against a small adapter (``common.Lib``)
and shared with ``impls.theano_impl``, which runs the very same builders on
Theano 1.0.5.

Strategies, as implemented here:

* RNN ``compiled``: ``scan`` over time (padded steps keep the state), forward,
  gradient and optimiser update compiled into one function per purpose.
* RNN ``loop``: a Python loop over time steps calling a compiled one-step
  cell; training runs backpropagation through time from Python with a
  compiled one-step vector-Jacobian product (the step's gradient graph,
  made by the framework's own ``grad``, fed the forward's saved
  pre-activations instead of recomputing them).
* RvNN ``recursive``: one compiled leaf or internal cell call per node (rows
  [1, *]); backward likewise, one compiled VJP call per node, parents first.
* RvNN ``levels``: the same compiled cells, called once per height with
  every node of that height across the batch.
* RvNN ``compiled``: ``scan`` over the packed static form's steps (node
  groups whose children are ready), with gathers and ``set_subtensor`` into a
  node buffer [N + 2, H].

Compiled code: PyTensor 3's default mode links with numba (each function is
JIT-compiled at its first call, which the runner's first-call time sees);
Theano's default links its C backend (``cvm``). ``info()`` names the linker.

Shapes: PyTensor and Theano compile shape-generic graphs (one compiled
function serves every batch shape), so nothing is bucketed; the packed tree
form is exact (``TreeBatch.padded_packed(bucketed=False)``), with at least one step.

Threads: the runner's OMP/OPENBLAS variables, and ``threadpoolctl`` limits
applied at construction, cap the BLAS that the compiled code calls;
``info()`` reports the pools found.

This module must not import pytensor: the registry reads ``NOT_APPLICABLE``
without loading the framework.
"""

from bench.interface import NO_PLAIN

NOT_APPLICABLE = {
    **NO_PLAIN,
    ("*", "fused"): "PyTensor has no fused RNN/LSTM operator: a recurrence is a scan over "
                    "a cell graph (that is the 'compiled' strategy)",
}
