"""RvNN and Tree-LSTM in NumPy: the reference's node loop (strategy ``recursive``)."""

from .common import NumpyReference


class RvNN(NumpyReference):
    family = "rvnn"
