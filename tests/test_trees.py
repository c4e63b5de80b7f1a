import numpy as np
import pytest

from bench.trees import ParseError, Tree, build_tree, parse_tree, read_trees


def test_parse_leaf_and_nested_tree():
    t = parse_tree("(3 (2 The) (4 (2 film) (4 rocks)))")
    assert t.label == 3 and not t.is_leaf
    assert t.left.token == "The" and t.left.label == 2
    assert t.tokens() == ["The", "film", "rocks"]
    assert t.size == 5 and t.height == 2
    assert parse_tree("(1 word)").is_leaf


def test_round_trip_through_text():
    text = "(4 (2 (2 a) (1 b)) (3 c))"
    assert parse_tree(text).to_string() == text
    assert parse_tree(text) == parse_tree(text)
    assert parse_tree(text) != parse_tree("(4 (2 a) (3 c))")


def test_tokens_split_on_ascii_space_only():
    t = parse_tree("(2 (2 8\u00a01\\/2) (2 x))")
    assert t.tokens() == ["8\u00a01\\/2", "x"]


@pytest.mark.parametrize("text,col,expected", [
    ("(3 (2 The) (4 film rocks))", 20, "')'"),
    ("(3 (2 The)", 11, "')'"),
    ("(x a)", 2, "an integer node label"),
    ("(3 (2 a) (2 b) (2 c))", 16, "')'"),
    ("(3 (2 a))", 9, "'('"),
    ("3 a", 1, "'('"),
    ("(3 (2 a) (2 b)) extra", 17, "end of line"),
    ("()", 2, "a node label"),
    ("(1_0 a)", 2, "an integer node label (ASCII digits)"),        # int() would take it
    ("(3 (\u0663 a) (2 b))", 5, "an integer node label (ASCII digits)"),  # Arabic-Indic 3
    ("(+1 a)", 2, "an integer node label"),
])
def test_malformed_input_names_place_and_expectation(text, col, expected):
    with pytest.raises(ParseError) as info:
        parse_tree(text, source="f.txt", line=7)
    err = info.value
    assert (err.source, err.line, err.column) == ("f.txt", 7, col)
    assert expected in err.expected
    assert str(err).startswith("f.txt:7:%d: expected" % col)


def test_read_trees_reports_file_and_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("(1 (2 a) (2 b))\n\n(1 (2 a) (2 b)\n", encoding="utf-8")
    with pytest.raises(ParseError) as info:
        read_trees(str(p))
    assert info.value.line == 3 and info.value.source == str(p)


def test_labels_outside_the_range_name_their_column():
    assert parse_tree("(4 (0 a) (2 b))", labels=range(5)).label == 4
    for text, col in (("(5 (0 a) (2 b))", 2), ("(4 (0 a) (-1 b))", 11)):
        with pytest.raises(ParseError) as info:
            parse_tree(text, source="f.txt", labels=range(5))
        assert info.value.column == col and "a node label in 0..4" in str(info.value)


def test_bytes_that_are_not_utf8_name_line_and_column(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"(1 (2 a) (2 b))\n(1 (2 caf\xe9) (2 b))\n")
    with pytest.raises(ParseError) as info:
        read_trees(str(p))
    assert (info.value.line, info.value.column) == (2, 10)
    assert str(info.value) == "%s:2:10: expected UTF-8 text, found byte 0xe9" % p


def test_trees_are_immutable():
    t = parse_tree("(1 a)")
    with pytest.raises(AttributeError):
        t.label = 3


def test_deep_chain_parses_without_recursion_error():
    text = "(1 a)"
    for _ in range(3000):
        text = "(1 %s (1 b))" % text
    t = parse_tree(text)
    assert t.height == 3000 and len(t.tokens()) == 3001
    assert len(list(t.postorder())) == t.size


@pytest.mark.parametrize("shape", ["balanced", "left", "right", "random"])
def test_build_tree_shapes_keep_token_order(shape):
    toks = list(range(1, 18))
    t = build_tree(shape, toks, rng=np.random.default_rng(0))
    assert t.tokens() == toks and t.size == 2 * len(toks) - 1
    height = {"balanced": 5, "left": 16, "right": 16}
    if shape in height:
        assert t.height == height[shape]
    if shape == "left":
        assert all(n.right.is_leaf for n in t.postorder() if not n.is_leaf)
    if shape == "right":
        assert all(n.left.is_leaf for n in t.postorder() if not n.is_leaf)


def test_build_tree_rejects_bad_input():
    with pytest.raises(ValueError):
        build_tree("zigzag", [1, 2])
    with pytest.raises(ValueError):
        build_tree("left", [])
    with pytest.raises(ValueError):
        Tree(1, token="a", left=Tree(1, token="b"), right=Tree(1, token="c"))
