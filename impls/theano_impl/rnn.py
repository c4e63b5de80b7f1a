"""Elman RNN and LSTM on Theano 1.0.5: ``impls.pytensor_impl.rnn`` with Theano as the backend."""

from impls.pytensor_impl.rnn import RNN as _SymbolicRNN

from . import NOT_APPLICABLE


class RNN(_SymbolicRNN):
    framework = "theano"
    backend = "theano"
    not_applicable = NOT_APPLICABLE
