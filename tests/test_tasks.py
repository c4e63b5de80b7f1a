import json
import os
from collections import Counter

import numpy as np
import pytest

from bench.tasks import (LISTOPS_OPS, Vocab, check_task_name, expr_depth, generate_listops,
                         listops_eval, listops_tokens, listops_tree, load_listops, load_sst,
                         load_synthetic, load_task, train_size)
from bench.trees import ParseError


@pytest.fixture(scope="module")
def sst5():
    return load_sst(5)


def test_sst_split_sizes(sst5):
    assert {k: len(v) for k, v in sst5.splits.items()} == {"train": 8544, "dev": 1101, "test": 2210}
    sst2 = load_sst(2)
    assert {k: len(v) for k, v in sst2.splits.items()} == {"train": 6920, "dev": 872, "test": 1821}
    assert {e.label for e in sst2.train} == {0, 1}
    assert sst2.num_classes == 2


def test_sst_examples_have_both_forms_of_one_sentence(sst5):
    ex = sst5.train[0]
    assert list(ex.tokens) == ex.tree.tokens()
    assert ex.label == ex.tree.label == 3
    assert sst5.vocab.itos[ex.tokens[0]] == "The"
    # vocabulary from train only: dev words unseen in train map to the unknown id 0
    assert 0 in {t for e in sst5.splits["test"] for t in e.tokens}
    assert 0 not in {t for e in sst5.train for t in e.tokens}
    root_labels = Counter(e.label for e in sst5.train)
    assert [root_labels[i] for i in range(5)] == [1092, 2218, 1624, 2322, 1288]


def test_vocab_is_deterministic_and_reserves_unknown():
    v = Vocab.from_examples([["b", "a", "b"], ["c"]])
    assert v.itos == ["<unk>", "b", "a", "c"]
    assert v.encode("zzz") == 0


@pytest.mark.parametrize("expr,value", [
    (("MAX", [2, 9, 1]), 9),
    (("MIN", [4, 3, ("MAX", [0, 8])]), 3),
    (("MED", [5, 1, 9]), 5),
    (("MED", [1, 2, 4, 8]), 3),          # (2 + 4) // 2
    (("MED", [1, 2]), 1),                # floored
    (("SM", [7, 8, 9]), 4),              # 24 mod 10
    (("SM", [("MAX", [9, 1]), ("MIN", [3, 5])]), 2),
])
def test_listops_evaluator(expr, value):
    assert listops_eval(expr) == value


def test_listops_sequence_and_tree_forms_agree():
    expr = ("MAX", [2, ("MIN", [4, 7]), 0])
    toks = listops_tokens(expr)
    assert toks == ["[MAX", "2", "[MIN", "4", "7", "]", "0", "]"]
    tree = listops_tree(expr)
    assert tree.tokens() == toks
    assert tree.label == 4
    labelled = sorted(n.label for n in tree.postorder() if not n.is_leaf and n.label >= 0)
    assert labelled == [4, 4]  # the two closing nodes: MIN -> 4, MAX -> 4


def test_listops_distribution_over_10k_trees():
    rng = np.random.default_rng(0)
    ops = digits = 0
    depths, labels = [], Counter()
    n_args = Counter()
    for _ in range(10000):
        expr = generate_listops(rng)
        depths.append(expr_depth(expr))
        labels[listops_eval(expr)] += 1
        stack = list(expr[1])          # the root is always an operator; count the rest
        n_args[len(expr[1])] += 1
        while stack:
            e = stack.pop()
            if isinstance(e, int):
                digits += 1
            else:
                ops += 1
                n_args[len(e[1])] += 1
                stack.extend(e[1])
    share = ops / (ops + digits)
    assert 0.22 < share < 0.28           # p(operator) = 0.25 below the depth cap
    assert max(depths) <= 20 and max(depths) >= 6
    assert set(n_args) == {2, 3, 4, 5}
    assert all(0.2 < n_args[k] / sum(n_args.values()) < 0.3 for k in n_args)
    assert set(labels) == set(range(10))
    assert max(labels.values()) / 10000 < 0.4   # no label dominates


def test_listops_dataset_is_seeded_unique_and_filtered():
    a = load_listops(300, 30, 30, seed=5, max_length=40)
    b = load_listops(300, 30, 30, seed=5, max_length=40)
    assert [e.tokens for e in a.train] == [e.tokens for e in b.train]
    every = a.train + a.splits["dev"] + a.splits["test"]
    assert len({e.tokens for e in every}) == 360
    assert max(len(e.tokens) for e in every) <= 40
    c = load_listops(300, 30, 30, seed=6, max_length=40)
    assert [e.tokens for e in a.train] != [e.tokens for e in c.train]
    assert all(0 <= e.label <= 9 for e in every)


def test_synthetic_and_task_names():
    ds = load_synthetic("left", 16, n_examples=10, seed=1)
    assert all(len(e.tokens) == 16 and e.tree.height == 15 for e in ds.train)
    assert load_task("synth-balanced-8").train[0].tree.height == 3
    with pytest.raises(ValueError):
        load_task("synth-zigzag-8")
    with pytest.raises(ValueError):
        check_task_name("imdb")
    check_task_name("synth-random-100")
    assert set(LISTOPS_OPS) == {"MIN", "MAX", "MED", "SM"}


def test_train_size_matches_the_loaded_split_without_loading_it(sst5):
    assert train_size("sst") == len(sst5.train) == 8544
    assert train_size("sst2") == 6920
    assert train_size("listops") == len(load_listops().train)
    assert train_size("synth-left-8") == len(load_task("synth-left-8").train)


def _sst_dir(tmp_path, train, dev="(1 (2 a) (2 b))\n", test="(3 (2 a) (4 b))\n"):
    d = tmp_path / "mysst"
    d.mkdir()
    for name, text in (("train", train), ("dev", dev), ("test", test)):
        (d / ("%s.txt" % name)).write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


@pytest.mark.parametrize("train,line,col,what", [
    ("(1 (2 a) (2 b))\n(7 (2 a) (2 b))\n", 2, 2, "a node label in 0..4"),        # 5 classes: 0..4
    ("(1 (2 a) (2 b))\n(1 (2 a) (1_0 b))\n", 2, 11, "ASCII digits"),
    ("(1 (2 a) (\u0661 b))\n", 1, 11, "ASCII digits"),
    (b"(1 (2 a) (2 \xff))\n", 1, 13, "UTF-8 text"),
    ("", 1, 1, "at least one tree"),
    ("\n\n", 1, 1, "at least one tree"),
])
def test_sst_loader_refuses_bad_files_naming_the_real_path(tmp_path, train, line, col, what):
    d = _sst_dir(tmp_path, train)
    with pytest.raises(ParseError) as info:
        load_sst(5, data_dir=str(d))
    err = info.value
    # the custom directory's own file, not the package's sst/train.txt
    assert (err.source, err.line, err.column) == (str(d / "train.txt"), line, col)
    assert what in str(err)


def test_binary_sst_refuses_a_split_of_only_neutral_roots(tmp_path):
    d = _sst_dir(tmp_path, "(1 (2 a) (2 b))\n", dev="(2 (2 a) (2 b))\n")
    with pytest.raises(ParseError) as info:
        load_sst(2, data_dir=str(d))
    assert info.value.source == str(d / "dev.txt") and "only neutral roots" in str(info.value)
    assert len(load_sst(5, data_dir=str(d)).splits["dev"]) == 1


# --- the SST parse cache -------------------------------------------------------------------

def _same_dataset(a, b):
    assert (a.name, a.num_classes, a.vocab.itos) == (b.name, b.num_classes, b.vocab.itos)
    assert {k: len(v) for k, v in a.splits.items()} == {k: len(v) for k, v in b.splits.items()}
    for split in a.splits:
        for x, y in zip(a.splits[split], b.splits[split]):
            assert (x.tokens, x.label) == (y.tokens, y.label)
            assert x.tree.to_string() == y.tree.to_string()
            assert tuple(x.tree)[4:] == tuple(y.tree)[4:]    # size and height


def test_sst_from_the_cache_is_the_parsed_treebank(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    parsed = load_sst(5, cache=False)
    first, again = load_sst(5), load_sst(5)
    assert first.origin == "parsed (no cache file yet)" and again.origin == "cache"
    _same_dataset(again, parsed)
    # one file per class count, named by the data's checksum and the loader code's
    assert load_sst(2).origin.startswith("parsed") and load_sst(2).origin == "cache"
    names = sorted(os.listdir(str(tmp_path / "cache")))
    assert [n.split("-")[0] for n in names] == ["sst2", "sst5"]
    assert len({n.split("-")[1] for n in names}) == 1          # one data checksum


SMALL = "(3 (2 (1 a) (2 b)) (4 c))\n(1 (2 a) (0 d))\n"


def _cache_file(tmp_path):
    (path,) = [os.path.join(str(tmp_path / "cache"), n) for n in os.listdir(str(tmp_path / "cache"))
               if n.endswith(".npz")]
    return path


def _rewrite_npz(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped byte", "not one tree",
                                    "token out of range", "label out of range", "other data",
                                    "bad vocabulary"])
def test_a_damaged_cache_is_never_trusted_but_parsed_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    d = _sst_dir(tmp_path, SMALL)
    truth = load_sst(5, data_dir=str(d), cache=False)
    assert load_sst(5, data_dir=str(d)).origin.startswith("parsed")
    path = _cache_file(tmp_path)
    with np.load(path) as z:
        tokens, labels, meta = z["tokens"].copy(), z["labels"].copy(), z["meta"].tobytes()
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"not a zip file at all")
    elif damage == "flipped byte":      # the zip's CRC catches it
        data = bytearray(open(path, "rb").read())
        at = data.index(labels.tobytes())
        data[at] ^= 0x01
        open(path, "wb").write(bytes(data))
    elif damage == "not one tree":      # an internal node turned into a leaf: two trees left over
        tokens[np.flatnonzero(tokens < 0)[0]] = 1
        _rewrite_npz(path, tokens=tokens)
    elif damage == "token out of range":
        tokens[0] = 10 ** 6
        _rewrite_npz(path, tokens=tokens)
    elif damage == "label out of range":
        labels[0] = 9
        _rewrite_npz(path, labels=labels)
    elif damage == "other data":        # a file whose key names other data files
        other = json.loads(meta.decode())
        other["data_sha256"] = "0" * 64
        _rewrite_npz(path, meta=np.frombuffer(json.dumps(other).encode(), dtype=np.uint8))
    elif damage == "bad vocabulary":
        other = json.loads(meta.decode())
        other["vocab"] = other["vocab"][:1] + other["vocab"][:1]
        _rewrite_npz(path, meta=np.frombuffer(json.dumps(other).encode(), dtype=np.uint8))
    got = load_sst(5, data_dir=str(d))
    assert got.origin.startswith("parsed (cache file unusable"), got.origin
    _same_dataset(got, truth)
    again = load_sst(5, data_dir=str(d))          # rewritten whole: used from now on
    assert again.origin == "cache"
    _same_dataset(again, truth)


def test_the_cache_follows_the_data_and_is_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    d = _sst_dir(tmp_path, SMALL)
    assert load_sst(5, data_dir=str(d)).origin.startswith("parsed")
    (d / "train.txt").write_text(SMALL + "(4 (4 e) (3 f))\n")   # edited data: a new key
    got = load_sst(5, data_dir=str(d))
    assert got.origin.startswith("parsed") and len(got.train) == 3
    assert load_sst(5, data_dir=str(d)).origin == "cache"
    assert len(os.listdir(str(tmp_path / "cache"))) == 2
    # a parse error writes nothing
    (d / "train.txt").write_text("(9 (2 a) (2 b))\n")
    with pytest.raises(ParseError):
        load_sst(5, data_dir=str(d))
    assert len(os.listdir(str(tmp_path / "cache"))) == 2
    # an empty BENCH_CACHE_DIR turns it off; an unwritable one only costs the parse
    (d / "train.txt").write_text(SMALL)
    monkeypatch.setenv("BENCH_CACHE_DIR", "")
    assert "cache off" in load_sst(5, data_dir=str(d)).origin
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(blocker / "cache"))
    got = load_sst(5, data_dir=str(d))
    assert got.origin.startswith("parsed (cache not written") and len(got.train) == 2
