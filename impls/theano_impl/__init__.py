"""Theano 1.0.5 as a framework: the PyTensor implementation's graph code, run on Theano.

``impls.pytensor_impl`` writes every graph against a small adapter
(``pytensor_impl.common.Lib``); these classes only name Theano as the backend,
so both frameworks run the same code where the APIs allow. The API
differences the adapter hides are the sigmoid's name
(``theano.tensor.nnet.sigmoid``), ``scan``'s return value (PyTensor is asked
for its outputs alone) and the name of the BLAS config key; ``grad``,
``function`` with ``givens`` and ``updates``, ``shared``, ``set_subtensor``
and integer-array indexing are the same.

Strategies: as in ``impls.pytensor_impl`` (RNN ``compiled`` and ``loop``;
RvNN ``compiled``, ``levels`` and ``recursive``); RNN ``fused`` is not
applicable. Theano 1.0.5 needs Python <= 3.10 with ``numpy<1.22`` and
``scipy<1.8``; it compiles with its C backend (``g++``), caching modules
under ``base_compiledir`` (THEANO_FLAGS), and without a linked BLAS it runs
matrix products through NumPy's C API (NumPy's own BLAS).

This module must not import theano: the registry reads ``NOT_APPLICABLE``
without loading the framework.
"""

from bench.interface import NO_PLAIN

NOT_APPLICABLE = {
    **NO_PLAIN,
    ("*", "fused"): "Theano has no fused RNN/LSTM operator on the CPU: a recurrence is a scan "
                    "over a cell graph (that is the 'compiled' strategy)",
}
