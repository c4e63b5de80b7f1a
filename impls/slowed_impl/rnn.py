from .common import Slowed


class RNN(Slowed):
    family = "rnn"
