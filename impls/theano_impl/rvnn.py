"""RvNN and Tree-LSTM on Theano 1.0.5: ``impls.pytensor_impl.rvnn`` with Theano as the backend."""

from impls.pytensor_impl.rvnn import RvNN as _SymbolicRvNN

from . import NOT_APPLICABLE


class RvNN(_SymbolicRvNN):
    framework = "theano"
    backend = "theano"
    not_applicable = NOT_APPLICABLE
