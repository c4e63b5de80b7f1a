"""The mutation table: small semantic bugs the verification gate must catch.

Each entry is applied to a temporary copy of ``bench/`` and ``impls/`` (never to
the working tree) by replacing ``old`` with ``new`` in ``file``; ``old`` must
occur exactly once there, so a refactor that moves the code makes the suite
fail loudly instead of silently testing nothing (``tests/test_mutants.py``
checks every anchor on every test run). ``cells`` are the cells whose gate runs
the mutated code, as ``framework/model/strategy``; ``overrides`` change fields
of the preset's cell (e.g. the optimiser a bug lives in). ``kind`` groups the
mutations by the bug classes the gate is meant to catch.

Run them with ``nox -s mutants`` (``python tests/mutants/driver.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str            # relative to the repository root
    old: str             # exact text, found exactly once in ``file``
    new: str
    cells: Tuple[str, ...]   # framework/model/strategy
    kind: str
    description: str
    overrides: Tuple[Tuple[str, object], ...] = ()

    @property
    def framework(self) -> str:
        return self.cells[0].split("/")[0]


MUTATIONS = (
    # --- PyTorch ---
    Mutation(
        "torch-lstm-swapped-gates", "impls/torch_impl/rnn.py",
        "    i, f, _, o = torch.sigmoid(z).chunk(4, 1)",
        "    f, i, _, o = torch.sigmoid(z).chunk(4, 1)",
        ("torch/lstm/loop",), "swapped gates",
        "the LSTM step reads the input gate as the forget gate and vice versa"),
    Mutation(
        "torch-loop-padding-leak", "impls/torch_impl/rnn.py",
        "        out.first_masked = int(lengths.min())",
        "        out.first_masked = int(lengths.max())",
        ("torch/lstm/loop",), "padding leak",
        "the loop RNN treats every step as real: padded steps update h and c"),
    Mutation(
        "torch-compiled-rejoin-order", "impls/torch_impl/rnn.py",
        "        h = torch.cat([h] + done[::-1]) if done else h",
        "        h = torch.cat([h] + done) if done else h",
        ("torch/lstm/compiled",), "wrong example order",
        "the compiled RNN re-joins examples that finished in earlier chunks in the wrong order"),
    Mutation(
        "torch-treelstm-shared-forget-gate", "impls/torch_impl/rvnn.py",
        "    torch.mul(i, z_u.tanh_(), out=c_out).addcmul_(f_l, c_l).addcmul_(f_r, c_r)",
        "    torch.mul(i, z_u.tanh_(), out=c_out).addcmul_(f_l, c_l).addcmul_(f_l, c_r)",
        ("torch/treelstm/levels",), "shared forget gate",
        "the Tree-LSTM node gates its right child's memory with the left forget gate"),
    Mutation(
        "torch-levels-swapped-children", "impls/torch_impl/rvnn.py",
        "out.level_lr = [long_tensor(lr.reshape(-1), dev) for lr in batch.level_children()]",
        "out.level_lr = [long_tensor(lr[:, ::-1].reshape(-1), dev) for lr in batch.level_children()]",
        ("torch/rvnn/levels",), "swapped children",
        "levels reads each node's children as [right; left]"),
    Mutation(
        "torch-compiled-level-before-children", "impls/torch_impl/rvnn.py",
        "                for s in range(0, ready.level_node.shape[0], LEVEL_CHUNK):\n"
        "                    hbuf, cbuf = self._c_levels(",
        "                for s in reversed(range(0, ready.level_node.shape[0], LEVEL_CHUNK)):\n"
        "                    hbuf, cbuf = self._c_levels(",
        ("torch/treelstm/compiled",), "level before its children",
        "the compiled Tree-LSTM runs its chunks of node groups last to first"),
    Mutation(
        "torch-all-loss-over-trees", "impls/torch_impl/rvnn.py",
        "        out = PreparedTrees(labels=long_tensor(points.labels, dev),\n"
        "                            count=float(points.count),",
        "        out = PreparedTrees(labels=long_tensor(points.labels, dev),\n"
        "                            count=float(batch.size),",
        ("torch/treelstm/levels",), "wrong all-node loss averaging",
        "the all-node loss is divided by the number of trees, not of labelled nodes "
        "(a root-loss cell: only the gate's second loss mode sees it)"),
    Mutation(
        "torch-adam-doubled-lr", "impls/torch_impl/common.py",
        "        return torch.optim.Adam(params, lr=cfg.lr,",
        "        return torch.optim.Adam(params, lr=2 * cfg.lr,",
        ("torch/rvnn/levels",), "scaled learning rate",
        "Adam runs with twice the configured learning rate"),
    Mutation(
        "torch-sgd-doubled-lr", "impls/torch_impl/common.py",
        "        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=wd, fused=True)",
        "        return torch.optim.SGD(params, lr=2 * cfg.lr, weight_decay=wd, fused=True)",
        ("torch/elman/fused",), "scaled learning rate",
        "SGD runs with twice the configured learning rate (an SGD cell, lr 0.05)",
        overrides=(("optimizer", "sgd"), ("lr", 0.05))),
    Mutation(
        "torch-adam-decay-dropped", "impls/torch_impl/common.py",
        '                                eps=ADAM["eps"], weight_decay=wd, fused=True)',
        '                                eps=ADAM["eps"], fused=True)',
        ("torch/treelstm/levels",), "dropped weight decay",
        "Adam ignores the weight decay (a cell with decay 0.01: the step at the cell's own "
        "decay and the gate's probe step both see it)",
        overrides=(("weight_decay", 0.01),)),
    Mutation(
        "torch-rvnn-wrong-nonlinearity", "impls/torch_impl/rvnn.py",
        "    return torch.tanh(affine(hlr, W, b)), None",
        "    return torch.sigmoid(affine(hlr, W, b)), None",
        ("torch/rvnn/recursive",), "wrong nonlinearity",
        "the RvNN's internal node applies a sigmoid instead of tanh"),
    # --- JAX ---
    Mutation(
        "jax-lstm-swapped-gates", "impls/jax_impl/rnn.py",
        "    i, f, g, o = jnp.split(z, 4, axis=-1)",
        "    f, i, g, o = jnp.split(z, 4, axis=-1)",
        ("jax/lstm/compiled",), "swapped gates",
        "the LSTM cell reads the input gate as the forget gate and vice versa"),
    Mutation(
        "jax-loop-padding-leak", "impls/jax_impl/rnn.py",
        "live = (np.arange(padded.shape[1])[:, None] < lens[None, :])[:, :, None]",
        "live = (np.arange(padded.shape[1])[:, None] < T)[:, :, None].repeat(len(lens), 1)",
        ("jax/elman/loop",), "padding leak",
        "the loop RNN's mask marks every step up to the batch's longest as real"),
    Mutation(
        "jax-rnn-skipped-last-step", "impls/jax_impl/rnn.py",
        '        for t in range(prep["steps"]):',
        '        for t in range(prep["steps"] - 1):',
        ("jax/elman/loop",), "skipped last step",
        "the loop RNN stops one step before the batch's longest sequence ends"),
    Mutation(
        "jax-treelstm-dropped-forget-gate", "impls/jax_impl/rvnn.py",
        "+ jax.nn.sigmoid(fl) * c_l + jax.nn.sigmoid(fr) * c_r",
        "+ jax.nn.sigmoid(fl) * c_l + c_r",
        ("jax/treelstm/compiled",), "dropped forget gate",
        "the Tree-LSTM node adds its right child's memory ungated"),
    Mutation(
        "jax-levels-before-children", "impls/jax_impl/rvnn.py",
        "        for h in range(1, batch.num_levels):",
        "        for h in range(batch.num_levels - 1, 0, -1):",
        ("jax/treelstm/levels",), "level before its children",
        "levels runs the heights top down, so parents read children not yet computed"),
    Mutation(
        "jax-all-loss-over-rows", "impls/jax_impl/common.py",
        "    count = jnp.maximum(jnp.sum(keep), 1).astype(logits.dtype)",
        "    count = jnp.asarray(labels.shape[0], logits.dtype)",
        ("jax/treelstm/compiled",), "wrong all-node loss averaging",
        "the loss is divided by every row of the padded node buffer, labelled or not "
        "(a root-loss cell: only the gate's second loss mode sees it; `levels` scales its "
        "loss on the host and no longer calls this function)"),
    Mutation(
        "jax-adam-no-bias-correction", "impls/jax_impl/common.py",
        '        opt = optax.adam(cfg.lr, b1=ADAM["beta1"], b2=ADAM["beta2"], eps=ADAM["eps"])',
        '        opt = optax.chain(optax.scale_by_adam(b1=ADAM["beta1"], b2=ADAM["beta2"], '
        'eps=ADAM["eps"]), optax.scale_by_schedule(lambda t: -cfg.lr * (1 - ADAM["beta1"] '
        '** (t + 1))))',
        ("jax/lstm/compiled",), "wrong Adam bias correction",
        "Adam's first moment is used without its bias correction"),
    Mutation(
        "jax-decay-after-adam-scaling", "impls/jax_impl/common.py",
        "        opt = optax.chain(optax.add_decayed_weights(float(cfg.weight_decay)), opt)",
        "        opt = optax.chain(opt, optax.add_decayed_weights(float(cfg.weight_decay)))",
        ("jax/lstm/compiled",), "weight decay after the optimiser's scaling",
        "add_decayed_weights chained after Adam's scaling (updates + wd * theta: the decay "
        "bypasses the moments and the learning rate); a cell without decay, so only the "
        "gate's probe step at bench.verify.DECAY_PROBE sees it"),
    # --- TensorFlow ---
    Mutation(
        "tf-lstm-swapped-gates", "impls/tf_impl/rnn.py",
        "        i, f, g, o = tf.split(z, 4, axis=1)",
        "        i, f, o, g = tf.split(z, 4, axis=1)",
        ("tensorflow/lstm/compiled",), "swapped gates",
        "the LSTM step swaps the output gate and the cell candidate"),
    Mutation(
        "tf-fused-gate-layout", "impls/tf_impl/rnn.py",
        "KERAS_LSTM_FROM_CANONICAL = (0, 1, 2, 3)",
        "KERAS_LSTM_FROM_CANONICAL = (0, 2, 1, 3)",
        ("tensorflow/lstm/fused",), "swapped gates",
        "the canonical -> Keras LSTM weight mapping swaps the forget and candidate blocks"),
    Mutation(
        "tf-compiled-padding-leak", "impls/tf_impl/rnn.py",
        "        live = (np.arange(T_pad)[:, None] < lengths[None, :])[:, :, None]",
        "        live = (np.arange(T_pad)[:, None] < T)[:, :, None].repeat(len(lengths), 1)",
        ("tensorflow/lstm/compiled",), "padding leak",
        "the while-loop RNN's mask marks every step up to the batch's longest as real"),
    Mutation(
        "tf-compiled-skipped-last-step", "impls/tf_impl/rnn.py",
        '        out = tf.while_loop(lambda t, *_: t < p["steps"], body, state, maximum_iterations=T)',
        '        out = tf.while_loop(lambda t, *_: t < p["steps"] - 1, body, state, '
        'maximum_iterations=T)',
        ("tensorflow/lstm/compiled",), "skipped last step",
        "the while-loop RNN stops one step early"),
    Mutation(
        "tf-levels-swapped-children", "impls/tf_impl/rvnn.py",
        '                        "level_lr": [put(np.stack([batch.left[o[h]:o[h + 1]],\n'
        '                                                   batch.right[o[h]:o[h + 1]]], axis=1))',
        '                        "level_lr": [put(np.stack([batch.right[o[h]:o[h + 1]],\n'
        '                                                   batch.left[o[h]:o[h + 1]]], axis=1))',
        ("tensorflow/rvnn/levels",), "swapped children",
        "levels gathers each node's children as [right; left]"),
    Mutation(
        "tf-all-loss-over-trees", "impls/tf_impl/rvnn.py",
        '        return masked_xent(self._head(self._hidden(p, all_nodes=self.cfg.loss_mode == "all")),\n'
        '                           p["labels"])',
        '        return masked_xent(self._head(self._hidden(p, all_nodes=self.cfg.loss_mode == "all")),\n'
        '                           p["labels"]) * tf.reduce_sum(tf.cast(p["labels"] >= 0, tf.float32)) '
        '/ tf.cast(tf.size(p["root"]), tf.float32)',
        ("tensorflow/treelstm/levels",), "wrong all-node loss averaging",
        "the all-node loss is divided by the number of trees, not of labelled nodes "
        "(a root-loss cell: only the gate's second loss mode sees it)"),
    Mutation(
        "tf-adam-doubled-lr", "impls/tf_impl/common.py",
        "                self._opt = keras_optimizer(self.cfg.optimizer, self.cfg.lr)",
        "                self._opt = keras_optimizer(self.cfg.optimizer, 2 * self.cfg.lr)",
        ("tensorflow/rvnn/compiled",), "scaled learning rate",
        "Keras' Adam runs with twice the configured learning rate"),
    Mutation(
        "tf-rvnn-leaf-wrong-nonlinearity", "impls/tf_impl/rvnn.py",
        "    if model == \"rvnn\":\n        return tf.tanh(z), None\n    # Blocks [i, o | u]",
        "    if model == \"rvnn\":\n        return tf.nn.relu(z), None\n    # Blocks [i, o | u]",
        ("tensorflow/rvnn/compiled",), "wrong nonlinearity",
        "the RvNN's leaves apply a ReLU instead of tanh"),
)

# What the issue asks the suite to cover (tests/test_mutants.py checks the table has each).
REQUIRED_KINDS = ("swapped gates", "dropped forget gate", "shared forget gate", "swapped children",
                  "level before its children", "padding leak", "skipped last step",
                  "wrong nonlinearity", "scaled learning rate", "wrong Adam bias correction",
                  "wrong all-node loss averaging", "wrong example order",
                  "dropped weight decay", "weight decay after the optimiser's scaling")

# The subset `nox -s tests` runs (tests/test_mutants.py): one per framework, smoke sizes.
SUBSET = ("torch-loop-padding-leak", "jax-all-loss-over-rows", "tf-adam-doubled-lr")
