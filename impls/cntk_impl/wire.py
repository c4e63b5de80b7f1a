"""Framing of the CNTK worker protocol, shared by the host (3.11) and the worker (3.6).

Standard library and NumPy only, and Python 3.6 syntax: the worker imports
this file as a top-level module (``worker.py``'s folder is on its path), the
host as ``impls.cntk_impl.wire``. The message kinds are documented in the
package docstring (``impls/cntk_impl/__init__.py``).

One message on the byte stream::

    b"CNTKW1"                magic (6 bytes)
    u32 big-endian           length of the header
    u64 big-endian           length of the arrays blob (0: no arrays)
    header                   UTF-8 JSON object, always with a "kind" field
    blob                     the bytes of a .npz file (numpy.savez, no pickles)
"""

import io
import json
import struct

import numpy as np

MAGIC = b"CNTKW1"
_LENGTHS = struct.Struct(">IQ")
PREFIX = len(MAGIC) + _LENGTHS.size


class ProtocolError(Exception):
    """The byte stream does not hold a well-formed message."""


def encode_arrays(arrays):
    """dict name -> array  ->  .npz bytes (b"" for no arrays)."""
    if not arrays:
        return b""
    buf = io.BytesIO()
    np.savez(buf, **{str(k): np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def decode_arrays(blob):
    """.npz bytes -> dict name -> array (pickled objects are refused)."""
    if not blob:
        return {}
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def encode(header, arrays=None):
    """One message as bytes."""
    if "kind" not in header:
        raise ProtocolError("a message header needs a 'kind'")
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    blob = encode_arrays(arrays)
    return MAGIC + _LENGTHS.pack(len(head), len(blob)) + head + blob


def parse_prefix(prefix):
    """The fixed-size prefix -> (header length, blob length)."""
    if len(prefix) != PREFIX or prefix[:len(MAGIC)] != MAGIC:
        raise ProtocolError("bad message prefix %r (expected magic %r)" % (prefix[:16], MAGIC))
    return _LENGTHS.unpack(prefix[len(MAGIC):])


def decode_body(head, blob):
    header = json.loads(head.decode("utf-8"))
    if not isinstance(header, dict) or "kind" not in header:
        raise ProtocolError("message header without a 'kind': %r" % (header,))
    return header, decode_arrays(blob)


def read_exact(stream, n):
    """Exactly ``n`` bytes from a binary stream; EOFError if it ends first."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError("stream ended after %d of %d bytes" % (got, n))
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_message(stream):
    """(header, arrays) from a blocking binary stream (the worker's side)."""
    head_len, blob_len = parse_prefix(read_exact(stream, PREFIX))
    return decode_body(read_exact(stream, head_len), read_exact(stream, blob_len))


def write_message(stream, header, arrays=None):
    stream.write(encode(header, arrays))
    stream.flush()
