"""Elman RNN and LSTM in NumPy: the reference's time loop (strategy ``loop``)."""

from .common import NumpyReference


class RNN(NumpyReference):
    family = "rnn"
