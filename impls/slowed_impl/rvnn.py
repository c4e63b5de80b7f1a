from .common import Slowed


class RvNN(Slowed):
    family = "rvnn"
