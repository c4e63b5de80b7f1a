"""The CNTK 2.7 worker: runs under Python 3.6 with NumPy and CNTK only (no ``bench`` imports).

Started by the host (``impls.cntk_impl.common``) as ``$BENCH_CNTK_PYTHON worker.py``;
it reads requests from stdin and writes replies to stdout, framed by
``wire.py`` (the message kinds are documented in ``impls/cntk_impl/__init__.py``).
File descriptor 1 is pointed at stderr before anything else runs, so nothing
CNTK or NumPy prints can corrupt the protocol stream.

Models (the suite's equations, ``bench/params.py`` names, float32):

* one CNTK ``parameter`` per canonical parameter, created here with zeros and
  filled by ``load_params``; ``fused`` keeps the recurrent cell's weights in
  the layout of CNTK's own ``layers.LSTM`` / ``layers.RNNStep`` (see
  ``_to_layout``);
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
"""

import os
import sys

# The protocol owns the original stdout; fd 1 (C++ printf, print()) goes to stderr.
_PROTO_OUT = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
_PROTO_IN = os.fdopen(os.dup(0), "rb")

import collections  # noqa: E402
import hashlib  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

import wire  # noqa: E402  (this file's folder is on sys.path)

C = None            # the cntk module, once imported
CNTK_ERROR = None   # why cntk did not import
GRAPH_CACHE = 64    # graphs kept per model instance (least recently used dropped)


class Unavailable(Exception):
    """Reported to the host as bench.interface.Unavailable."""


def _import_cntk():
    global C, CNTK_ERROR
    try:
        import cntk
        C = cntk
    except Exception as exc:  # reported in every reply that needs it
        CNTK_ERROR = "%s: %s" % (type(exc).__name__, str(exc).strip().splitlines()[0]
                                 if str(exc).strip() else "")


def _need_cntk():
    if C is None:
        raise Unavailable("cntk does not import in the worker (%s, Python %s): %s"
                          % (sys.executable, platform.python_version(), CNTK_ERROR))


# --- the cells, on CNTK tensors whose last axis holds the features ---

def _static(x):
    """Drop the batch axis (one sample, so the sum is the identity): CNTK's gather wants a
    reference without dynamic axes."""
    return None if x is None else C.reduce_sum(x, axis=C.Axis.default_batch_axis())


def _sl(x, begin, end):
    return C.slice(x, -1, begin, end)


def lstm_cell(z, c_prev, H):
    """z [.., 4H] blocks [i, f, g, o] -> (h, c)."""
    s = C.sigmoid(z)
    i, f, o = _sl(s, 0, H), _sl(s, H, 2 * H), _sl(s, 3 * H, 4 * H)
    g = C.tanh(_sl(z, 2 * H, 3 * H))
    c = i * g if c_prev is None else f * c_prev + i * g
    return o * C.tanh(c), c


def treelstm_leaf(z, H):
    """z [.., 3H] blocks [i, o, u]."""
    s = C.sigmoid(_sl(z, 0, 2 * H))
    c = _sl(s, 0, H) * C.tanh(_sl(z, 2 * H, 3 * H))
    return _sl(s, H, 2 * H) * C.tanh(c), c


def treelstm_node(z, c_l, c_r, H):
    """z [.., 5H] blocks [i, f_l, f_r, o, u]."""
    s = C.sigmoid(_sl(z, 0, 4 * H))
    c = _sl(s, 0, H) * C.tanh(_sl(z, 4 * H, 5 * H)) + _sl(s, H, 2 * H) * c_l + _sl(s, 2 * H, 3 * H) * c_r
    return _sl(s, 3 * H, 4 * H) * C.tanh(c), c


def xent(z, y, w):
    """Weighted softmax cross-entropy summed over the rows of z (last axis: classes)."""
    lse = C.reduce_log_sum_exp(z, axis=-1)
    zy = C.reduce_sum(z * y, axis=-1)
    return C.reduce_sum(w * (lse - zy))


# LSTM gate blocks: canonical [i, f, g, o]; CNTK's layers.LSTM computes
# [i, g, f, o] (cntk/layers/blocks.py: it, bit, ft, ot). The permutation is its own inverse.
_CNTK_LSTM_BLOCKS = (0, 2, 1, 3)


def _permute_blocks(a, H):
    return np.concatenate([a[..., k * H:(k + 1) * H] for k in _CNTK_LSTM_BLOCKS], axis=-1)


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
    def __init__(self, spec):
        _need_cntk()
        self.spec = spec
        self.model = spec["model"]
        self.family = spec["family"]
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
        self.params = collections.OrderedDict()
        fused_cell = ("W_x", "W_h", "b") if self.strategy == "fused" else ()
        for name, shape in self.schema.items():
            if name not in fused_cell:
                self.params[name] = C.parameter(shape=shape, init=0.0, name=name)
        if self.strategy == "fused":
            self._build_fused_cell()
        self._make_optimizer_state()
        if self.strategy == "fused":
            t0 = time.perf_counter()
            self.graphs["fused"] = self._build("fused", None)
            self.stats["graph_build_s"] += time.perf_counter() - t0
            self.stats["graphs_built"] += 1

    # --- parameters ---
    def _build_fused_cell(self):
        """CNTK's own recurrent block; its W, H, b replace W_x, W_h, b."""
        if self.model == "lstm":
            block = C.layers.LSTM(self.H, init=0.0, init_bias=0.0)
        else:
            block = C.layers.RNNStep(self.H, activation=C.tanh, init=0.0, init_bias=0.0)
        self.recurrence = C.layers.Recurrence(block)
        probe = C.sequence.input_variable(self.D)
        out = self.recurrence(probe)   # infers W's input dimension
        by_name = {p.name: p for p in out.parameters}
        for canon, layer in (("W_x", "W"), ("W_h", "H"), ("b", "b")):
            self.params[canon] = by_name[layer]

    def _to_layout(self, name, value):
        if self.strategy == "fused" and self.model == "lstm" and name in ("W_x", "W_h", "b"):
            return _permute_blocks(value, self.H)
        return value

    _from_layout = _to_layout   # a block permutation that is its own inverse

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

    def _graph(self, ready):
        graphs = self.graphs if self.wd == self.built_wd else self.probe_graphs
        g = graphs.get(ready.key)
        if g is None:
            t0 = time.perf_counter()
            g = self._build(ready.key, ready)
            self.stats["graph_build_s"] += time.perf_counter() - t0
            self.stats["graphs_built"] += 1
            graphs[ready.key] = g
            while len(graphs) > GRAPH_CACHE:
                graphs.popitem(last=False)
                self.stats["graphs_evicted"] += 1
        else:
            graphs.move_to_end(ready.key)
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

    def _build(self, key, ready):
        if self.family == "rnn":
            return self._build_fused() if self.strategy == "fused" else self._build_loop(key[1])
        if self.strategy == "recursive":
            return self._build_recursive(ready)
        return self._build_levels(key)

    def _rnn_io(self):
        return {"y": C.input_variable(self.C, name="y"), "w": C.input_variable(1, name="w")}

    def _build_loop(self, T):
        """The time loop unrolled in Python: one cell per step, padded steps keep h (and c)."""
        p, H = self.params, self.H
        G = 4 * H if self.model == "lstm" else H
        inputs = self._rnn_io()
        inputs["tok"] = C.input_variable(T, name="tok")
        inputs["live"] = C.input_variable((T, 1), name="live")
        xp = C.times(C.gather(p["E"], inputs["tok"]), p["W_x"]) + p["b"]     # [T, G]
        h = c = None
        for t in range(T):
            z = C.reshape(C.slice(xp, 0, t, t + 1), (G,))
            if h is not None:
                z = z + C.times(h, p["W_h"])
            if self.model == "lstm":
                h_new, c_new = lstm_cell(z, c, H)
            else:
                h_new, c_new = C.tanh(z), None
            if t == 0:       # every sequence has a first token
                h, c = h_new, c_new
            else:
                live = C.slice(inputs["live"], 0, t, t + 1)
                h = C.element_select(live, h_new, h)
                if c is not None:
                    c = C.element_select(live, c_new, c)
        logits = self._head(h)
        return self._finish(inputs, logits, xent(logits, inputs["y"], inputs["w"]))

    def _build_fused(self):
        """layers.Recurrence over CNTK's sequence axis; sequence.last is the last real token."""
        inputs = self._rnn_io()
        inputs["tok"] = C.sequence.input_variable(1, name="tok")
        x = C.reshape(C.gather(self.params["E"], inputs["tok"]), (self.D,))
        h = C.sequence.last(self.recurrence(x))
        logits = self._head(h)
        return self._finish(inputs, logits, xent(logits, inputs["y"], inputs["w"]))

    def _tree_io(self, P):
        return {"y": C.input_variable((P, self.C), name="y"),
                "w": C.input_variable((P, 1), name="w")}

    def _leaf(self, x):
        p = self.params
        z = C.times(x, p["W_leaf"]) + p["b_leaf"]
        if self.model == "rvnn":
            return C.tanh(z), None
        return treelstm_leaf(z, self.H)

    def _node(self, hl, hr, cl, cr):
        if self.model == "rvnn":
            return C.tanh(C.times(C.splice(hl, hr, axis=-1), self.params["W"]) + self.params["b"]), None
        z = C.times(C.splice(hl, hr, axis=-1), self.params["U"]) + self.params["b_U"]
        return treelstm_node(z, cl, cr, self.H)

    def _levels_up(self, inputs, hbuf, cbuf, widths):
        """One gather + cell per level (``widths[k]`` nodes at level k), appended to the
        node buffers; adds the index input ``lr<k>`` of each level to ``inputs``."""
        H = self.H
        for k, n in enumerate(widths):
            idx = inputs["lr%d" % k] = C.input_variable(2 * n, name="lr%d" % k)
            hlr = C.reshape(C.gather(hbuf, idx), (n, 2 * H))
            cl = cr = None
            if cbuf is not None:
                clr = C.reshape(C.gather(cbuf, idx), (n, 2 * H))
                cl, cr = _sl(clr, 0, H), _sl(clr, H, 2 * H)
            h, c = self._node(_sl(hlr, 0, H), _sl(hlr, H, 2 * H), cl, cr)
            hbuf = C.splice(hbuf, _static(h), axis=0)
            if cbuf is not None:
                cbuf = C.splice(cbuf, _static(c), axis=0)
        return hbuf, cbuf

    def _build_levels(self, key):
        """Dynamic batching: all leaves in one product, then one gather + product per height.

        ``compiled`` runs it on a bucketed static layout, so that one graph serves every
        batch of the same bucket: node buffer rows 0 = a zero row (padding reads it), 1..Lf'
        the leaves, then W' rows per level for L' levels (Lf', W', L' next powers of two; the
        rows of padding entries hold values nothing reads). In ``all`` mode its loss is
        taken over every row (weight 0 off the labelled nodes), so its shape is fixed too."""
        _, n_leaves, widths, B, P = key
        inputs = self._tree_io(P)
        inputs["leaf_tok"] = C.input_variable(n_leaves, name="leaf_tok")
        inputs["roots"] = C.input_variable(B, name="roots")
        # CNTK's gather wants a reference without dynamic axes (and its backprop fails when
        # its output has none), so the node buffers drop the batch axis (one sample: the
        # reduction is the identity) and the gathered rows have it again, from the indices.
        hbuf, cbuf = map(_static, self._leaf(C.gather(self.params["E"], inputs["leaf_tok"])))
        if self.strategy == "compiled":
            zero = C.constant(np.zeros((1, self.H), np.float32))
            hbuf = C.splice(zero, hbuf, axis=0)
            cbuf = None if cbuf is None else C.splice(zero, cbuf, axis=0)
        hbuf, cbuf = self._levels_up(inputs, hbuf, cbuf, widths)
        logits = self._head(C.gather(hbuf, inputs["roots"]))
        points = logits if self.loss_mode == "root" else self._head(hbuf)
        return self._finish(inputs, logits, xent(points, inputs["y"], inputs["w"]))

    def _build_recursive(self, ready):
        """One cell per node, wired as the tree is: no batching across nodes. Leaf
        embeddings come from one gather (a gather per leaf would make a dense [V, D]
        gradient per leaf), each leaf row is sliced out and goes through its own cell."""
        left, right, roots = ready.left, ready.right, ready.roots
        n_leaves, N = ready.key[1], len(left)
        P = len(roots) if self.loss_mode == "root" else N
        inputs = self._tree_io(P)
        inputs["leaf_tok"] = C.input_variable(n_leaves, name="leaf_tok")
        x = C.gather(self.params["E"], inputs["leaf_tok"])                   # [Lf, D]
        hs, cs = [None] * N, [None] * N
        for n in range(N):      # children come before parents in a TreeBatch
            if left[n] < 0:
                hs[n], cs[n] = self._leaf(C.slice(x, 0, n, n + 1))
            else:
                l, r = left[n], right[n]
                hs[n], cs[n] = self._node(hs[l], hs[r], cs[l], cs[r])
        stack = lambda rows: rows[0] if len(rows) == 1 else C.splice(*rows, axis=0)
        logits = self._head(stack([hs[r] for r in roots]))
        points = logits if self.loss_mode == "root" else self._head(stack(hs))
        return self._finish(inputs, logits, xent(points, inputs["y"], inputs["w"]))

    # --- batches: the host sends the feeds (``rnn.py`` / ``rvnn.py``) ---
    def prepare(self, arrays):
        ready = self._ready(dict(arrays))
        handle = self.next_handle
        self.next_handle += 1
        self.prepared[handle] = ready
        return handle

    def _ready(self, feeds):
        """The feeds and the key of the graph they run on, read off their shapes."""
        if self.family == "rnn":
            if self.strategy == "fused":   # CNTK's sequence axis: one array per sequence
                lengths = feeds.pop("lengths")
                feeds["tok"] = [row[:n, None] for row, n in zip(feeds["tok"], lengths)]
                return Ready("fused", feeds)
            return Ready(("loop", feeds["tok"].shape[1]), feeds)
        n_leaves = feeds["leaf_tok"].shape[1]
        if self.strategy == "recursive":
            structure = [feeds.pop(name) for name in ("left", "right", "root")]
            digest = hashlib.sha1()
            for arr in structure:
                digest.update(np.ascontiguousarray(arr, np.int64).tobytes())
                digest.update(b"|")
            ready = Ready(("recursive", n_leaves, digest.hexdigest()), feeds)
            ready.left, ready.right, ready.roots = (arr.tolist() for arr in structure)
            return ready
        levels = sum(1 for name in feeds if name.startswith("lr"))
        widths = tuple(feeds["lr%d" % k].shape[1] // 2 for k in range(levels))
        return Ready((self.strategy, n_leaves, widths, feeds["roots"].shape[1], feeds["y"].shape[1]),
                     feeds)

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
        if len(handles) > GRAPH_CACHE:
            # more graphs than the cache keeps: some would be rebuilt inside the clock
            raise ValueError("%d batches in one timed loop; at most %d (GRAPH_CACHE)"
                             % (len(handles), GRAPH_CACHE))
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

    def info(self):
        detail = {
            "loop": "time loop unrolled in Python into one static graph per padded length T "
                    "(element_select keeps h/c on padded steps), batch on CNTK's batch axis",
            "fused": "layers.Recurrence(layers.%s) over CNTK's dynamic sequence axis, "
                     "sequence.last" % ("LSTM" if self.model == "lstm" else "RNNStep(tanh)"),
            "levels": "one static graph per level-width signature: one gather + product + "
                      "splice per tree height, the batch as one CNTK sample",
            "recursive": "one static graph per tree structure, one cell per node (no batching "
                         "across nodes), the batch as one CNTK sample",
            "compiled": "the levels schedule on a bucketed static layout (leaves, level count "
                        "and level width padded to powers of two): one graph per bucket",
        }[self.strategy]
        out = {"cntk": C.__version__, "worker_python": platform.python_version(),
               "numpy_worker": np.__version__, "strategy_detail": detail,
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
    _need_cntk()
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


class Worker(object):
    def __init__(self):
        self.models = {}
        self.next_id = 1

    def model(self, header):
        if header.get("impl") not in self.models:
            raise LookupError("no implementation with id %r in this worker" % (header.get("impl"),))
        return self.models[header["impl"]]

    def handle(self, header, arrays):
        """One request -> (reply header, reply arrays)."""
        release = header.get("release") or {}
        for impl, h in release.get("handles", []):
            if impl in self.models:
                self.models[impl].prepared.pop(h, None)
        for impl in release.get("impls", []):
            self.models.pop(impl, None)
        kind = header["kind"]
        ok = {"kind": "ok"}
        if kind == "hello":
            ok.update(python=platform.python_version(), executable=sys.executable, pid=os.getpid(),
                      numpy=np.__version__, cntk=getattr(C, "__version__", None),
                      cntk_error=CNTK_ERROR)
            return ok, None
        if kind == "create":
            model = Model(header["spec"])
            impl = self.next_id
            self.next_id += 1
            self.models[impl] = model
            ok["impl"] = impl
            return ok, None
        if kind == "gemm_flops":
            ok["flops"] = gemm_flops(int(header["n"]), int(header["repeats"]))
            return ok, None
        m = self.model(header)
        if kind == "load_params":
            m.load_params(arrays)
            return ok, None
        if kind == "export_params":
            return ok, m.export_params()
        if kind == "set_weight_decay":
            m.set_weight_decay(header["weight_decay"])
            return ok, None
        if kind == "prepare":
            ok["handle"] = m.prepare(arrays)
            return ok, None
        if kind == "logits":
            return ok, {"logits": m.logits(m.ready(header["handle"]))}
        if kind == "train_step":
            ok["loss"] = m.train_step(m.ready(header["handle"]))
            return ok, None
        if kind == "loss_and_grads":
            ok["loss"], grads = m.loss_and_grads(m.ready(header["handle"]))
            return ok, grads
        if kind == "timed_passes":
            ok["seconds"] = m.timed_passes(header["call"], header["handles"], header["repeats"])
            return ok, None
        if kind == "timed_calls":
            ok["seconds"] = m.timed_calls(header["call"], header["handles"])
            return ok, None
        if kind == "info":
            ok["info"] = m.info()
            return ok, None
        raise ValueError("unknown request kind %r" % (kind,))

    def serve(self):
        while True:
            try:
                header, arrays = wire.read_message(_PROTO_IN)
            except EOFError:
                return 0       # the host closed the pipe: exit quietly
            if header.get("kind") == "shutdown":
                wire.write_message(_PROTO_OUT, {"kind": "ok"})
                return 0
            try:
                reply, out = self.handle(header, arrays)
            except Exception as exc:
                # CNTK appends a long native call stack to its messages: keep the message
                message = str(exc).split("[CALL STACK]")[0].strip() or type(exc).__name__
                reply = {"kind": "error", "type": type(exc).__name__, "message": message,
                         "traceback": traceback.format_exc()[-6000:]}
                out = None
            wire.write_message(_PROTO_OUT, reply, out)


# CNTK walks its graphs recursively in native code: an LSTM time loop unrolled over 1000
# steps overflows the main thread's default 8 MiB stack (SIGSEGV). The worker therefore
# serves from a thread with a large stack (address space only, touched as needed).
SERVE_STACK_BYTES = 1 << 30


def main():
    import threading
    _import_cntk()
    status = []
    threading.stack_size(SERVE_STACK_BYTES)
    thread = threading.Thread(target=lambda: status.append(Worker().serve()), name="serve")
    thread.start()
    thread.join()
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
