"""CNTK 2.7 as a framework, run in a Python 3.6 worker process.

CNTK 2.7 (the last release) has wheels for Python <= 3.6 only, and the bench
core needs 3.8+. So the host classes (``rnn.RNN``, ``rvnn.RvNN``, on
``common.CNTKImplementation``) run in the bench's interpreter, prepare each
batch's feeds, and forward every call to ONE persistent worker per host process::

    $BENCH_CNTK_PYTHON impls/cntk_impl/worker.py      (Python 3.6, numpy + cntk only)

which builds and runs the models (equations of ``bench/reference.py``,
parameter names of ``bench/params.py``). File for file, the worker mirrors the
host: ``worker.py`` is the process and its request loop, ``worker_common.py``
the model base (parameters, optimisers, graph cache, timing), ``worker_rnn.py``
and ``worker_rvnn.py`` the graphs of ``rnn.py`` and ``rvnn.py``; the worker
imports nothing of ``bench``. ``worker_probe`` is the registry's
import probe: it raises ImportError with the reason when ``BENCH_CNTK_PYTHON``
is unset or not runnable, or CNTK does not import there. CNTK needs
``libmpi.so.12`` / ``libmpi_cxx.so.1`` on ``LD_LIBRARY_PATH`` (Debian's
``libopenmpi3`` plus two symlinks; ``fetch_deps.sh`` beside this file fetches them, run by the noxfile).

Protocol (framing in ``wire.py``)
---------------------------------
The host writes requests to the worker's stdin, the worker answers each with
exactly one reply on its stdout (its fd 1 is moved to stderr first, so stray
prints cannot corrupt the stream). A message is a 6-byte magic ``CNTKW1``,
two big-endian lengths (u32 header, u64 blob), a UTF-8 JSON header with a
``kind``, and a blob holding a ``.npz`` file (NumPy arrays, never pickles; empty
when there are no arrays). Arrays travel only in the blob.

Any request header may carry ``release: {"handles": [[impl, handle], ...],
"impls": [impl, ...]}``: prepared batches and implementations the host has
dropped (garbage-collected), freed before the request is handled.

==================  =====================================  ==========================================
request ``kind``    header fields / arrays sent            reply (``kind: "ok"``) fields / arrays
==================  =====================================  ==========================================
``hello``           --                                     ``python, executable, pid, numpy, cntk,
                                                           cntk_error``
``create``          ``spec``: family, model, strategy,     ``impl`` (id of the new model instance)
                    device, threads, vocab_size,
                    embed_dim, hidden, num_classes,
                    loss_mode, optimizer, lr, adam,
                    adagrad (bench.interface constants),
                    schema ``[[name, shape], ...]``
``load_params``     ``impl``; arrays: canonical params     -- (optimiser state reset)
``export_params``   ``impl``                               arrays: canonical params (float32)
``prepare``         ``impl``; arrays: the batch as its     ``handle``
                    graph's feeds, prepared by the host
                    (``rnn.py``, ``rvnn.py`` name them)
``logits``          ``impl, handle``                       arrays: ``logits`` [B, C]
``loss_and_grads``  ``impl, handle``                       ``loss``; arrays: canonical gradients
``train_step``      ``impl, handle``                       ``loss`` (before the update)
``timed_passes``    ``impl, call`` ("train_step" |         ``seconds``: one wall time per pass over
                    "logits"), ``handles, repeats``        the handles, clocked in the worker
``timed_calls``     ``impl, call, handles``                ``seconds``: one per call, in the worker
``info``            ``impl``                               ``info``: dict for the record
``gemm_flops``      ``n, repeats``                         ``flops``
``shutdown``        --                                     ``ok``, then the worker exits
==================  =====================================  ==========================================

``set_weight_decay`` (``impl, weight_decay``; reply ``ok``): graphs built from
then on use that coupled L2 decay (the gate's probe), apart from the cached ones.

Error reply: ``{"kind": "error", "type": <exception class>, "message": ...,
"traceback": <worker traceback>}``. The host raises ``Unavailable`` /
``NotApplicable`` / ``NotImplementedError`` for those types and
``common.WorkerError`` (message and worker traceback) for any other. A worker
that exits (or, with ``BENCH_CNTK_REPLY_TIMEOUT`` seconds set, stops
answering and is killed) raises ``common.WorkerDied`` with its exit status and
the tail of its stderr; the host never blocks on a dead worker (it waits on
the pipe with ``select`` and sees its end), and the next implementation
constructed starts a fresh worker.

Timing: the worker runs the timed loops itself (``timed_passes`` /
``timed_calls``, used by ``bench.cell`` through the optional Implementation
hooks of the same names), so the clock never includes IPC. First-call
(compile) times are measured by ``bench.cell`` around one request and so include
one round trip (a millisecond or less, against compile times of seconds).

Strategies: RNN ``loop`` and ``fused``; RvNN ``recursive``, ``levels`` and
``compiled`` (see ``rnn.py``, ``rvnn.py``); RNN ``compiled`` is not applicable
(``NOT_APPLICABLE``). Graph construction and compilation for a new length /
tree structure / level signature / bucket happen on the first call that needs
them (counted in the first-call and warm-up times, and in ``info()``:
``graphs_built``, ``graph_build_s``), and the compiled graphs are cached
(the 64 most recently used per implementation).

This module must not import the worker or CNTK: the registry reads
``NOT_APPLICABLE`` without loading the framework.
"""

from bench.interface import NO_PLAIN

_RNN_COMPILED = ("CNTK has no eager mode and no separate compiler for a time loop: every CNTK "
                 "model is a static graph compiled into a ComputationNetwork on its first call, "
                 "so 'loop' (the time loop unrolled into one static graph per length) already is "
                 "the compiled loop, and 'fused' is CNTK's own compiled recurrence; a 'compiled' "
                 "cell would time the same graphs again")

NOT_APPLICABLE = {
    **NO_PLAIN,
    ("elman", "compiled"): _RNN_COMPILED,
    ("lstm", "compiled"): _RNN_COMPILED,
}
