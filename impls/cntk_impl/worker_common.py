"""The CNTK worker's model base: what both families share (Python 3.6, NumPy and CNTK only).

The worker's counterpart of ``common.py`` (the host's Implementation base), as
``worker_rnn.py`` and ``worker_rvnn.py`` are of ``rnn.py`` and ``rvnn.py``.
The models (the suite's equations, ``bench/params.py`` names, float32):

* one CNTK ``parameter`` per canonical parameter, created here with zeros and
  filled by ``load_params``; ``fused`` keeps the recurrent cell's weights in
  the layout of CNTK's own ``layers.LSTM`` / ``layers.RNNStep`` (see
  ``worker_rnn``);
* each prepared batch arrives as the feeds of its graph, ready to use (the host
  builds them: ``rnn.py``, ``rvnn.py``); the family reads off their shapes the key
  of the graph they run on;
* graphs are static CNTK Functions, built on the first call that needs them
  and cached (``GRAPH_CACHE`` most recently used) by the shape or structure
  they were built for: per time-step count (``loop``), one for all batches
  (``fused``), per tree structure (``recursive``), per level-width signature
  (``levels``), per bucket of padded sizes (``compiled``);
* loss: the mean softmax cross-entropy over the labelled classification
  points, written as a weighted sum (weight 1/count at labelled points, 0
  elsewhere) so that CNTK's per-sample summation gives the mean;
* optimisers: the suite's SGD / Adam / Adagrad (constants from the host,
  ``bench.interface``) written as a CNTK ``universal`` learner (``assign``
  ops), because CNTK's built-in learners differ: its ``adagrad`` has no
  initial accumulator and rescales with an average multiplier, its ``adam``
  adds epsilon to the uncorrected second moment. Optimiser state lives in
  CNTK constants shared by the learners of every cached graph.

Imported by ``worker.py`` after it has moved fd 1 away from the protocol stream,
so whatever importing CNTK prints goes to stderr.
"""

import collections
import platform
import resource
import sys
import time

import numpy as np

try:
    import cntk as C
    CNTK_ERROR = None
except Exception as exc:  # reported in every reply that needs it
    C = None
    CNTK_ERROR = "%s: %s" % (type(exc).__name__, str(exc).strip().splitlines()[0]
                             if str(exc).strip() else "")

GRAPH_CACHE = 64    # graphs kept per model instance (least recently used dropped)


class Unavailable(Exception):
    """Reported to the host as bench.interface.Unavailable."""


def need_cntk():
    if C is None:
        raise Unavailable("cntk does not import in the worker (%s, Python %s): %s"
                          % (sys.executable, platform.python_version(), CNTK_ERROR))


# --- on CNTK tensors whose last axis holds the features ---

def cut(x, begin, end):
    """Features ``begin:end`` of ``x`` (its last axis): one gate block."""
    return C.slice(x, -1, begin, end)


def xent(z, y, w):
    """Weighted softmax cross-entropy summed over the rows of z (last axis: classes)."""
    lse = C.reduce_log_sum_exp(z, axis=-1)
    zy = C.reduce_sum(z * y, axis=-1)
    return C.reduce_sum(w * (lse - zy))


class Graph(object):
    """One static CNTK graph: named inputs, the logits and loss Functions, a Trainer."""

    def __init__(self, inputs, logits, loss, trainer, params):
        self.inputs = inputs     # name -> input Variable
        self.logits = logits     # Function: [B, C] (RNN: per sample [C])
        self.loss = loss         # Function: weighted loss (per sample / one scalar)
        self.trainer = trainer
        self.params = params     # [(name, Parameter)] the loss depends on


class Ready(object):
    """A prepared batch: feed arrays by input name, and the graph key it needs."""

    def __init__(self, key, feeds):
        self.key = key
        self.feeds = feeds
        self.graph = None
        self.args = None


class Model(object):
    """One model instance in the worker; ``worker_rnn.RNNModel`` and ``worker_rvnn.RvNNModel``
    add their graphs (``_build``) and how a batch's feeds name their graph (``_ready``)."""

    def __init__(self, spec):
        need_cntk()
        self.spec = spec
        self.model = spec["model"]
        self.strategy = spec["strategy"]
        self.D, self.H = spec["embed_dim"], spec["hidden"]
        self.C = spec["num_classes"]
        self.loss_mode = spec["loss_mode"]
        if spec["device"] == "gpu":
            gpus = [d for d in C.device.all_devices() if d.type() == C.device.DeviceKind.GPU]
            if not gpus:
                raise Unavailable("this CNTK (%s) sees no GPU device (the 'cntk' wheel is the "
                                  "CPU build; GPUs need 'cntk-gpu' and CUDA 10)" % C.__version__)
            C.device.try_set_default_device(C.device.gpu(gpus[0].id()))
        self.threads = int(spec["threads"])
        C.cntk_py.set_max_num_cputhreads(self.threads)
        # coupled L2 in _update; graphs (and their learners) at another decay than the
        # built one (the gate's probe, set_weight_decay) are kept apart, so the probe
        # evicts none of the timed pool's graphs
        self.wd = self.built_wd = float(spec.get("weight_decay", 0.0))
        self.probe_graphs = collections.OrderedDict()
        self.graphs = collections.OrderedDict()
        self.prepared = {}
        self.next_handle = 1
        self.stats = {"graphs_built": 0, "graph_build_s": 0.0, "graphs_evicted": 0}
        self.schema = collections.OrderedDict((name, tuple(shape)) for name, shape in spec["schema"])
        self.params = self._parameters()
        self._make_optimizer_state()

    # --- parameters ---
    def _parameters(self, skip=()):
        """A zero-filled CNTK parameter per canonical one (but ``skip``), in schema order."""
        return collections.OrderedDict((name, C.parameter(shape=shape, init=0.0, name=name))
                                       for name, shape in self.schema.items() if name not in skip)

    def _to_layout(self, name, value):
        """A canonical value in this model's parameter layout (the same, but for ``fused``)."""
        return value

    def _from_layout(self, name, value):
        return value

    def load_params(self, arrays):
        if set(arrays) != set(self.schema):
            raise ValueError("parameter names %s differ from the schema %s"
                             % (sorted(arrays), sorted(self.schema)))
        for name, shape in self.schema.items():
            value = np.asarray(arrays[name], np.float32)
            if value.shape != shape:
                raise ValueError("parameter %s has shape %s, not %s" % (name, value.shape, shape))
            self.params[name].value = np.ascontiguousarray(self._to_layout(name, value))
        self._reset_optimizer_state()

    def export_params(self):
        return collections.OrderedDict(
            (name, np.asarray(self._from_layout(name, self.params[name].value), np.float32))
            for name in self.schema)

    # --- optimiser: the suite's formulas as a universal learner ---
    def _make_optimizer_state(self):
        opt = self.spec["optimizer"]
        self.state = {}
        for name, p in self.params.items():
            st = {}
            if opt == "adam":
                st["m"] = C.constant(0.0, shape=p.shape, name=name + "_m")
                st["v"] = C.constant(0.0, shape=p.shape, name=name + "_v")
                st["t"] = C.constant(0.0, shape=(), name=name + "_t")
            elif opt == "adagrad":
                st["acc"] = C.constant(0.0, shape=p.shape, name=name + "_acc")
            self.state[p.uid] = st
        self._reset_optimizer_state()

    def _reset_optimizer_state(self):
        init = {"m": 0.0, "v": 0.0, "t": 0.0,
                "acc": float(self.spec["adagrad"]["initial_accumulator"])}
        for st in self.state.values():
            for key, const in st.items():
                const.value = np.full(const.shape, init[key], np.float32)

    def _update(self, parameters, gradients):
        opt, lr = self.spec["optimizer"], float(self.spec["lr"])
        adam, adagrad = self.spec["adam"], self.spec["adagrad"]
        wd = self.wd
        ups = []
        for p, g in zip(parameters, gradients):
            st = self.state[p.uid]
            if wd:
                g = g + wd * p   # coupled L2: every update below sees g + wd * theta
            if opt == "sgd":
                new = p - lr * g
            elif opt == "adagrad":
                acc = C.assign(st["acc"], st["acc"] + g * g)
                new = p - lr * g / (C.sqrt(acc) + adagrad["eps"])
            else:
                b1, b2 = adam["beta1"], adam["beta2"]
                t = C.assign(st["t"], st["t"] + 1.0)
                m = C.assign(st["m"], b1 * st["m"] + (1.0 - b1) * g)
                v = C.assign(st["v"], b2 * st["v"] + (1.0 - b2) * g * g)
                m_hat = m / (1.0 - C.pow(C.constant(b1), t))
                v_hat = v / (1.0 - C.pow(C.constant(b2), t))
                new = p - lr * m_hat / (C.sqrt(v_hat) + adam["eps"])
            ups.append(C.assign(p, new))
        return C.combine(ups)

    # --- graphs ---
    def set_weight_decay(self, wd):
        """Build graphs with decay ``wd`` from now on (kept in ``probe_graphs`` unless it is
        the built decay); the built ones stay cached."""
        self.wd = float(wd)
        if self.wd == self.built_wd:
            self.probe_graphs.clear()

    def _cached(self, graphs, key, ready):
        """The graph for ``key`` from ``graphs``, built (and timed) when it is not there."""
        g = graphs.get(key)
        if g is None:
            t0 = time.perf_counter()
            g = self._build(key, ready)
            self.stats["graph_build_s"] += time.perf_counter() - t0
            self.stats["graphs_built"] += 1
            graphs[key] = g
            while len(graphs) > GRAPH_CACHE:
                graphs.popitem(last=False)
                self.stats["graphs_evicted"] += 1
        else:
            graphs.move_to_end(key)
        return g

    def _graph(self, ready):
        graphs = self.graphs if self.wd == self.built_wd else self.probe_graphs
        g = self._cached(graphs, ready.key, ready)
        if ready.graph is not g:
            # The feeds become CNTK Values once, keyed by this graph's inputs (per Function:
            # CNTK warns about arguments a Function does not use). Converting on every call
            # instead costs ~5 ms per call for a batch of sequences.
            from cntk.internal import sanitize_var_map
            values = sanitize_var_map(list(g.inputs.values()),
                                      {g.inputs[name]: value for name, value in ready.feeds.items()})
            ready.graph = g
            ready.args = {key: {v: values[v] for v in fn.arguments}
                          for key, fn in (("logits", g.logits), ("loss", g.loss))}
        return g

    def _build(self, key, ready):
        """The graph for ``key`` (a Graph, from ``_finish``); ``ready`` is the batch that
        asked for it."""
        raise NotImplementedError

    def _finish(self, inputs, logits, loss):
        """Tie unused parameters in with a zero term (the Trainer wants the learner's
        parameters to be exactly the loss's), then the learner and Trainer."""
        used = {p.uid for p in loss.parameters}
        missing = [p for p in self.params.values() if p.uid not in used]
        for p in missing:
            loss = loss + 0.0 * C.reduce_sum(p, axis=C.Axis.all_static_axes())
        params = [(n, p) for n, p in self.params.items()]
        # a plain two-argument function: CNTK counts the arguments (a bound method has three)
        update = lambda parameters, gradients: self._update(parameters, gradients)
        learner = C.learners.universal(update, [p for _, p in params])
        trainer = C.Trainer(logits, (loss, None), [learner])
        return Graph(inputs, logits, loss, trainer, params)

    def _head(self, rows):
        return C.times(rows, self.params["W_o"]) + self.params["b_o"]

    # --- batches: the host sends each one as its graph's feeds ---
    def prepare(self, arrays):
        ready = self._ready(dict(arrays))
        handle = self.next_handle
        self.next_handle += 1
        self.prepared[handle] = ready
        return handle

    def _ready(self, feeds):
        """A Ready for the feeds of one batch: the key of its graph, read off their shapes."""
        raise NotImplementedError

    def ready(self, handle):
        if handle not in self.prepared:
            raise LookupError("no prepared batch with handle %r in this worker (released, or "
                              "prepared by another implementation)" % (handle,))
        return self.prepared[handle]

    # --- work ---
    def logits(self, ready):
        g = self._graph(ready)
        out = np.asarray(g.logits.eval(ready.args["logits"]), np.float32)
        return out.reshape(-1, self.C)   # trees: one CNTK sample holding [B, C]

    def train(self, ready):
        g = self._graph(ready)
        g.trainer.train_minibatch(ready.args["loss"])
        return g.trainer

    def train_step(self, ready):
        tr = self.train(ready)
        return float(tr.previous_minibatch_loss_average * tr.previous_minibatch_sample_count)

    def loss_and_grads(self, ready):
        g = self._graph(ready)
        wrt = [p for _, p in g.params]
        grads, loss = g.loss.grad(ready.args["loss"], wrt=wrt, outputs=[g.loss.output])
        out = collections.OrderedDict()
        for name, p in g.params:
            out[name] = np.asarray(self._from_layout(name, np.asarray(grads[p]).reshape(p.shape)),
                                   np.float32)
        return float(np.sum(loss)), out

    def _timed_readies(self, handles):
        # A timed sample cycles the pool: the same batches come back, and only distinct ones
        # need a graph each.
        distinct = len(set(handles))
        if distinct > GRAPH_CACHE:
            # more graphs than the cache keeps: some would be rebuilt inside the clock
            raise ValueError("%d distinct batches in one timed loop; at most %d (GRAPH_CACHE)"
                             % (distinct, GRAPH_CACHE))
        return [self.ready(h) for h in handles]

    def timed_passes(self, call, handles, repeats):
        readies = self._timed_readies(handles)
        fn = self._call_fn(call)
        out = []
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            for r in readies:
                fn(r)
            out.append(time.perf_counter() - t0)
        return out

    def timed_calls(self, call, handles):
        readies = self._timed_readies(handles)
        fn = self._call_fn(call)
        out = []
        for r in readies:
            t0 = time.perf_counter()
            fn(r)
            out.append(time.perf_counter() - t0)
        return out

    def _call_fn(self, call):
        if call == "train_step":
            return self.train
        if call == "logits":
            # as self.logits, without turning the output into NumPy inside the clock
            return lambda r: self._graph(r).logits.eval(r.args["logits"], as_numpy=False)
        raise ValueError("timed call is 'train_step' or 'logits', not %r" % (call,))

    def _detail(self):
        """One line on how this strategy runs, for the record."""
        raise NotImplementedError

    def info(self):
        out = {"cntk": C.__version__, "worker_python": platform.python_version(),
               "numpy_worker": np.__version__, "strategy_detail": self._detail(),
               "threads_requested": self.threads,
               "cntk_max_cpu_threads": int(C.cntk_py.get_max_num_cputhreads()),
               "optimizer_impl": "universal learner with the suite's formulas (assign ops)",
               "graph_cache_limit": GRAPH_CACHE,
               "graph_cache_size": len(self.graphs),
               "device": ("gpu" if C.device.use_default_device().type() == C.device.DeviceKind.GPU
                          else "cpu"),
               "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        out.update(self.stats)
        return out


def gemm_flops(n, repeats):
    """Achieved FLOP/s of an n x n x n float32 product in CNTK (median of repeats)."""
    need_cntk()
    rng = np.random.RandomState(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    from cntk.internal import sanitize_var_map
    x = C.input_variable(n)
    f = C.times(x, C.parameter(init=rng.standard_normal((n, n)).astype(np.float32)))
    args = sanitize_var_map(f.arguments, {x: a})   # n samples of n: one n x n x n product
    run = lambda: f.eval(args, as_numpy=False)     # no conversions inside the clock
    run()
    t0 = time.perf_counter()
    run()
    inner = max(1, int(5e-3 / max(time.perf_counter() - t0, 1e-7)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        times.append((time.perf_counter() - t0) / inner)
    return 2.0 * n ** 3 / float(np.median(times))
