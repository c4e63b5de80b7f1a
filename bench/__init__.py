"""RNN vs RvNN benchmark harness. Framework-neutral: it never imports a deep-learning framework."""

__version__ = "0.1.0"
