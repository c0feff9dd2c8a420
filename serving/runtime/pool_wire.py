"""The model pool's wire format: small fixed headers on a Unix socket, tensors in shared memory.

# design: each connection is one HTTP worker thread's, with one request in flight at a time. At
# connect the client passes a memfd (``socket.send_fds``) that both sides map: the client writes
# the input batch at offset 0 and sends a header naming the model, the shape and its deadline; the
# pool process reads the batch from the mapping, runs it (batched with whatever else is waiting),
# writes the probabilities back at offset 0 and answers with a header carrying the status and the
# output shape. No tensor is ever serialised: a 28x28 sample costs two headers of a few dozen bytes
# and two copies of 3 KB. Everything is float32, little-endian, C order.
"""

from __future__ import annotations

import socket
import struct

#: The first bytes of a connection: magic, protocol version, the mapping's size in bytes.
HELLO = struct.Struct("<4sHQ")
MAGIC = b"SVMP"
VERSION = 1
#: The pool's answer to a hello: status (200, else a refusal), then the length of a JSON body that
#: lists the served models ``{"models": ["name:version", ...]}`` or says why it refused.
HELLO_REPLY = struct.Struct("<HI")
#: A request: id, the model key's length, the number of dimensions, deadline (CLOCK_MONOTONIC
#: seconds, shared by every process of the machine; 0 = none). Then the key (UTF-8) and the dims.
REQUEST = struct.Struct("<IHHd")
#: An answer: id, status (200 or an HTTP error status), dims (200) or the message's length.
RESPONSE = struct.Struct("<IHH")
DIM = struct.Struct("<I")
#: struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO.
TIMEVAL = struct.Struct("@ll")
#: Longest model key and most dimensions a request may name: a header is never larger.
MAX_KEY = 512
MAX_DIMS = 4
PAGE = 4096


_DIMS = [struct.Struct(f"<{count}I") for count in range(MAX_DIMS + 1)]


def dims_bytes(shape: tuple[int, ...]) -> bytes:
    """The shape as the wire carries it."""
    return _DIMS[len(shape)].pack(*shape)


def read_dims(data: bytes | memoryview, count: int, offset: int = 0) -> tuple[int, ...]:
    """``count`` dimensions from ``data`` at ``offset``."""
    return _DIMS[count].unpack_from(data, offset)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from a blocking socket; ConnectionError if it closes first."""
    chunks, missing = [], size
    while missing:
        chunk = sock.recv(missing)
        if not chunk:
            raise ConnectionError("the model pool closed the connection")
        chunks.append(chunk)
        missing -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def mapping_size(max_samples: int, max_values_per_sample: int) -> int:
    """Bytes of shared memory one connection needs: the largest batch in or out, page-rounded."""
    size = max(1, max_samples * max_values_per_sample) * 4
    return -(-size // PAGE) * PAGE
