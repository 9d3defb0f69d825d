"""msgpack framing for protocol messages, defensive against hostile bytes.

Every message is one msgpack map in one ZeroMQ frame. Decoding never raises anything but
``CodecError``: a broken peer must not take the coordinator down.
"""
from __future__ import annotations

import msgpack

# Largest frame either side accepts. A train.py is tens of KB; dataset chunks are 1 MiB.
# The sockets also set ZMQ_MAXMSGSIZE to this, so bigger frames never reach Python.
MAX_FRAME_BYTES = 4 * 1024 * 1024


class CodecError(ValueError):
    """The bytes are not a well-formed message map."""


def encode(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode(data: bytes) -> dict:
    if len(data) > MAX_FRAME_BYTES:
        raise CodecError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise CodecError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise CodecError(f"message must be a map, got {type(obj).__name__}")
    return obj
