"""A test-only entry: the NumPy reference made slower by a known share, for ``bench ab``.

Registered only when ``BENCH_TEST_ENTRIES=1`` (``bench.registry``): never in a preset, a
listing or a report of a real run. Each inference call does the reference's work, then
keeps its thread busy so that a call whose work took t seconds of CPU costs t / (1 - s), s being
``BENCH_SLOWDOWN`` (a fraction, default 0): its throughput is (1 - s) times the
reference's, a slowdown of s as ``bench compare`` and ``bench ab`` define it. The extra is real work for
the CPU (a spin), so it competes for the cores as the reference's does; it is a slowdown
the suite's A/B check must see, and whose size is known. Cells of this entry should run
with one thread (``--threads 1``): the clock is the calling thread's.
"""

from impls.numpy_impl import NOT_APPLICABLE  # noqa: F401  (the same cells as numpy)

SLOWDOWN_ENV = "BENCH_SLOWDOWN"
