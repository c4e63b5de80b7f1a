"""Binary trees and a parser for PTB-style bracketed strings.

A tree line looks like ``(3 (2 The) (4 (2 film) (4 rocks)))``: every node is
``(LABEL CHILD...)`` and a leaf is ``(LABEL token)``. Tokens are split on the
ASCII space only (SST has tokens with a no-break space inside them).
"""

from __future__ import annotations

import re
from operator import itemgetter
from typing import Iterator, List, Optional, Sequence, Tuple


class ParseError(ValueError):
    """A malformed bracketed tree, with the place it went wrong."""

    def __init__(self, source: str, line: int, column: int, expected: str, found: str):
        self.source = source
        self.line = line
        self.column = column
        self.expected = expected
        self.found = found
        super().__init__(
            "%s:%d:%d: expected %s, found %s" % (source, line, column, expected, found)
        )


class Tree(tuple):
    """An immutable binary tree node (a tuple underneath, for speed: SST has 885k nodes).

    A leaf has a ``token`` (a string, or an int id once encoded) and no
    children; an internal node has exactly two children. ``label`` is an int
    class, or -1 where the node carries no label.
    """

    __slots__ = ()

    def __new__(cls, label: int, token=None, left: "Optional[Tree]" = None,
                right: "Optional[Tree]" = None):
        if left is None:
            if right is not None:
                raise ValueError("a node has either two children or none")
            if token is None:
                raise ValueError("a leaf needs a token")
            return tuple.__new__(cls, (int(label), token, None, None, 1, 0))
        if right is None:
            raise ValueError("a node has either two children or none")
        if token is not None:
            raise ValueError("an internal node has no token")
        hl, hr = left[5], right[5]
        return tuple.__new__(cls, (int(label), None, left, right, 1 + left[4] + right[4],
                                   1 + (hl if hl > hr else hr)))

    label = property(itemgetter(0), doc="int class, -1 where unlabelled")
    token = property(itemgetter(1), doc="leaf token (None inside)")
    left = property(itemgetter(2))
    right = property(itemgetter(3))
    size = property(itemgetter(4), doc="number of nodes")
    height = property(itemgetter(5), doc="0 for a leaf, else 1 + the taller child's height")

    @property
    def is_leaf(self) -> bool:
        return self.left is None

    def leaves(self) -> List["Tree"]:
        out = []
        stack = [self]
        while stack:
            node = stack.pop()
            if node.is_leaf:
                out.append(node)
            else:
                stack.append(node.right)
                stack.append(node.left)
        return out

    def tokens(self) -> list:
        return [leaf.token for leaf in self.leaves()]

    def postorder(self) -> Iterator["Tree"]:
        """Children before parents, left before right (no recursion: deep chains are fine)."""
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if node.is_leaf or expanded:
                yield node
            else:
                stack.append((node, True))
                stack.append((node.right, False))
                stack.append((node.left, False))

    def map_tokens(self, fn) -> "Tree":
        """A copy with every leaf token replaced by ``fn(token)``."""
        built = {}
        for node in self.postorder():
            if node.is_leaf:
                built[id(node)] = Tree(node.label, token=fn(node.token))
            else:
                built[id(node)] = Tree(node.label, left=built[id(node.left)],
                                       right=built[id(node.right)])
        return built[id(self)]

    def map_labels(self, fn) -> "Tree":
        """A copy with every label replaced by ``fn(label)``."""
        built = {}
        for node in self.postorder():
            if node.is_leaf:
                built[id(node)] = Tree(fn(node.label), token=node.token)
            else:
                built[id(node)] = Tree(fn(node.label), left=built[id(node.left)],
                                       right=built[id(node.right)])
        return built[id(self)]

    # Structural equality through the text form: tuple comparison would recurse
    # once per level and overflow on 1000-deep chains.
    def __eq__(self, other) -> bool:
        return isinstance(other, Tree) and self.to_string() == other.to_string()

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.to_string())

    def to_string(self) -> str:
        parts = {}
        for node in self.postorder():
            if node.is_leaf:
                parts[id(node)] = "(%d %s)" % (node.label, node.token)
            else:
                parts[id(node)] = "(%d %s %s)" % (
                    node.label, parts.pop(id(node.left)), parts.pop(id(node.right)))
        return parts[id(self)]

    def __repr__(self) -> str:
        text = self.to_string()
        return "Tree(%s)" % (text if len(text) < 80 else text[:77] + "...")


_TOKEN = re.compile(r"[()]|[^ ()]+")
# ASCII digits only: int() also takes "1_0" and other scripts' digits ("\u0663").
_LABEL = re.compile(r"-?[0-9]+")


def parse_tree(text: str, source: str = "<string>", line: int = 1,
               labels: Optional[range] = None) -> Tree:
    """Parse one bracketed binary tree. Raises ParseError on malformed input.

    ``labels``: the range every node label must fall in (None: any integer).
    """
    return _TreeParser(text, source, line, labels).parse()


class _TreeParser:
    """One line's tokens, with a cursor, read into one tree."""

    def __init__(self, text: str, source: str, line: int, labels: Optional[range]):
        text = text.rstrip("\r\n")
        self.tokens = [(m.group(), m.start() + 1) for m in _TOKEN.finditer(text)]
        self.end_col = len(text) + 1
        self.pos = 0
        self.source, self.line, self.labels = source, line, labels

    def peek(self) -> Tuple[str, int]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end of line", self.end_col)

    def fail(self, expected: str):
        tok, col = self.peek()
        found = tok if tok == "end of line" else repr(tok)
        raise ParseError(self.source, self.line, col, expected, found)

    def expect(self, what: str) -> None:
        tok, _ = self.peek()
        if tok != what:
            self.fail(repr(what))
        self.pos += 1

    def read_label(self) -> int:
        tok, _ = self.peek()
        if tok in ("(", ")", "end of line"):
            self.fail("a node label")
        if not _LABEL.fullmatch(tok):
            self.fail("an integer node label (ASCII digits)")
        value = int(tok)
        if self.labels is not None and value not in self.labels:
            self.fail("a node label in %d..%d" % (self.labels[0], self.labels[-1]))
        self.pos += 1
        return value

    def parse(self) -> Tree:
        # Iterative parse: an explicit stack of open nodes, so 1000-deep chains parse.
        self.expect("(")
        stack: List[Tuple[int, list]] = [(self.read_label(), [])]
        result = None
        while stack:
            tok, _ = self.peek()
            label, children = stack[-1]
            if tok == "(":
                self.open_child(children)
                stack.append((self.read_label(), []))
            elif tok == ")":
                node = self.close(label, children)
                stack.pop()
                if stack:
                    stack[-1][1].append(node)
                else:
                    result = node
            elif tok == "end of line":
                self.fail("')'")
            else:
                self.leaf_token(tok, children)
        if self.pos != len(self.tokens):
            self.fail("end of line")
        return result

    def open_child(self, children: list) -> None:
        """A '(' inside a node: its next child begins."""
        if children and isinstance(children[0], str):
            self.fail("')' (a leaf holds one token)")
        if len(children) == 2:
            self.fail("')' (a binary node has two children)")
        self.pos += 1

    def close(self, label: int, children: list) -> Tree:
        """A ')': the node is complete, a leaf (one token) or a binary node (two trees)."""
        if not children:
            self.fail("a token or '('")
        if len(children) == 1 and isinstance(children[0], Tree):
            self.fail("'(' (a binary node has two children)")
        self.pos += 1
        if isinstance(children[0], str):
            return Tree(label, token=children[0])
        return Tree(label, left=children[0], right=children[1])

    def leaf_token(self, tok: str, children: list) -> None:
        """A word inside a node: the leaf's token, which must be the node's only child."""
        if children:
            self.fail("'(' or ')'" if isinstance(children[0], Tree) and len(children) < 2 else "')'")
        self.pos += 1
        children.append(tok)


def read_trees(path, source: Optional[str] = None, labels: Optional[range] = None) -> List[Tree]:
    """One tree per non-empty line of a UTF-8 file (bytes that are not UTF-8: a ParseError)."""
    source = source or str(path)
    out = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[:exc.start].decode("utf-8", errors="replace")) + 1
                raise ParseError(source, lineno, column, "UTF-8 text",
                                 "byte 0x%02x" % raw[exc.start]) from None
            if text.strip(" \r\n"):
                out.append(parse_tree(text, source=source, line=lineno, labels=labels))
    return out


def build_tree(shape: str, tokens: Sequence, rng=None) -> Tree:
    """A tree over ``tokens`` (in order) of a given shape.

    shape: ``balanced`` (halves split at the middle), ``left`` (left-branching:
    ((a b) c) d ...), ``right`` (right-branching) or ``random`` (split point
    drawn uniformly at every node from ``rng``). Labels are -1.
    """
    if not tokens:
        raise ValueError("a tree needs at least one token")
    if shape == "left":
        node = Tree(-1, token=tokens[0])
        for tok in tokens[1:]:
            node = Tree(-1, left=node, right=Tree(-1, token=tok))
        return node
    if shape == "right":
        node = Tree(-1, token=tokens[-1])
        for tok in reversed(tokens[:-1]):
            node = Tree(-1, left=Tree(-1, token=tok), right=node)
        return node
    if shape not in ("balanced", "random"):
        raise ValueError("unknown tree shape %r (balanced, left, right, random)" % shape)
    if shape == "random" and rng is None:
        raise ValueError("shape 'random' needs an rng")

    # Iterative divide and conquer over spans [lo, hi).
    built = {}
    stack = [(0, len(tokens), False)]
    while stack:
        lo, hi, expanded = stack.pop()
        if hi - lo == 1:
            built[(lo, hi)] = Tree(-1, token=tokens[lo])
            continue
        if not expanded:
            mid = (lo + hi + 1) // 2 if shape == "balanced" else int(rng.integers(lo + 1, hi))
            built[("split", lo, hi)] = mid
            stack.append((lo, hi, True))
            stack.append((mid, hi, False))
            stack.append((lo, mid, False))
        else:
            mid = built.pop(("split", lo, hi))
            built[(lo, hi)] = Tree(-1, left=built.pop((lo, mid)), right=built.pop((mid, hi)))
    return built[(0, len(tokens))]
