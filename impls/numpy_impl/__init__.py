"""NumPy itself as a framework: inference only, straight from the reference.

It lets the runner work end to end with no deep-learning framework installed,
and gives a floor to compare against.
"""

from bench.interface import NO_PLAIN

_REASON = "numpy runs the reference as written: a time loop / one node at a time"
NOT_APPLICABLE = {
    **NO_PLAIN,
    ("*", "fused"): _REASON,
    ("*", "compiled"): _REASON,
    ("*", "levels"): _REASON,
}
