"""``mammoth.v1.Tensor`` <-> torch / numpy, zero-copy where the bytes allow it.

The wire format is raw little-endian C-order bytes plus a dtype name and a shape. Incoming
messages are validated (known dtype, non-negative shape, byte length, bool values) before any
view is made, and every error is a ``ValueError`` naming the field, so a malformed request is a
clean INVALID_ARGUMENT instead of a reshape error deep inside a stage.

bfloat16 has no numpy dtype: it travels as its 16-bit pattern. ``tensor_from_proto`` gives a
``torch.bfloat16`` tensor viewing those bits; ``ndarray_from_proto`` widens it to float32
(exact, since bfloat16 is the upper half of a float32).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from protos import common_pb2

if TYPE_CHECKING:
    import torch

# wire name -> little-endian numpy dtype of the stored bytes (bfloat16: its bit pattern)
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_NUMPY_NAMES = {np.dtype(n): n for n in ("float32", "float16", "int64", "int32", "uint8", "bool")}


def _torch():
    import torch  # lazy: the proxy and light clients use numpy only

    return torch


def tensor_to_proto(value: Any, *, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    """Serialize a torch tensor or numpy array (one copy into the message's bytes).

    ``out`` fills an existing message in place (e.g. ``req.text_condition``), which avoids the
    second copy that ``CopyFrom`` would make for large tensors.
    """
    msg = common_pb2.Tensor() if out is None else out
    if isinstance(value, np.ndarray):
        name = _NUMPY_NAMES.get(value.dtype.newbyteorder("="))
        if name is None:
            raise ValueError(f"tensor: unsupported numpy dtype {value.dtype}; use one of {sorted(WIRE_DTYPES)}")
        array = np.ascontiguousarray(value, dtype=WIRE_DTYPES[name])
    else:
        torch = _torch()
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensor: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
        name = str(value.dtype).removeprefix("torch.")
        if name not in WIRE_DTYPES:
            raise ValueError(f"tensor: unsupported torch dtype {value.dtype}; use one of {sorted(WIRE_DTYPES)}")
        t = value.detach().to("cpu").contiguous()
        if name == "bfloat16":
            t = t.view(torch.int16)  # same bits; numpy cannot hold bfloat16
        array = t.numpy()
        if sys.byteorder != "little":
            array = array.astype(array.dtype.newbyteorder("<"))
    msg.dtype = name
    del msg.shape[:]
    msg.shape.extend(int(d) for d in value.shape)
    msg.data = array.tobytes()
    return msg


def _validated_array(msg: common_pb2.Tensor, name: str) -> np.ndarray:
    """A read-only numpy view of ``msg.data`` with the wire dtype and shape (no copy)."""
    if not isinstance(msg, common_pb2.Tensor):
        raise TypeError(f"{name}: expected a mammoth.v1.Tensor, got {type(msg).__name__}")
    if not msg.dtype:
        raise ValueError(f"{name}: tensor is missing or has no dtype")
    wire = WIRE_DTYPES.get(msg.dtype)
    if wire is None:
        raise ValueError(f"{name}: unsupported dtype {msg.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{name}: negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * wire.itemsize
    if len(msg.data) != expected:
        raise ValueError(
            f"{name}: {len(msg.data)} data bytes do not match dtype {msg.dtype} and shape {list(shape)} "
            f"(expected {expected})"
        )
    if msg.dtype == "bool" and expected and np.frombuffer(msg.data, dtype=np.uint8).max() > 1:
        raise ValueError(f"{name}: bool tensor holds bytes other than 0 and 1")
    array = np.frombuffer(msg.data, dtype=wire).reshape(shape)
    if wire.byteorder == "<" and sys.byteorder != "little":
        array = array.astype(wire.newbyteorder("="))
    return array


def ndarray_from_proto(msg: common_pb2.Tensor, *, name: str = "tensor", copy: bool = False) -> np.ndarray:
    """numpy array of a Tensor message; read-only view of the message bytes unless ``copy``.

    bfloat16 is widened to float32 (always a new array).
    """
    array = _validated_array(msg, name)
    if msg.dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy() if copy else array


def tensor_from_proto(msg: common_pb2.Tensor, *, name: str = "tensor", copy: bool = False) -> torch.Tensor:
    """torch tensor of a Tensor message, sharing the message's bytes unless ``copy``.

    The shared tensor must be treated as read-only (the bytes belong to the message); pass
    ``copy=True`` to modify it in place or to keep it after the message is gone.
    """
    torch = _torch()
    array = _validated_array(msg, name)
    if copy:
        array = array.copy()
    with warnings.catch_warnings():
        # from_numpy warns on read-only arrays; sharing is intended, see the docstring.
        warnings.simplefilter("ignore", UserWarning)
        if msg.dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def tensor_field(parent: Any, field: str, *, required: bool = False, copy: bool = False) -> torch.Tensor | None:
    """``tensor_from_proto`` of a message's Tensor field, None when unset (or an error if required).

    Errors name the field (``text_condition: required``). For repeated fields call
    ``tensor_from_proto(item, name=f"ref_latents[{i}]")``.
    """
    if not parent.HasField(field):
        if required:
            raise ValueError(f"{field}: required")
        return None
    return tensor_from_proto(getattr(parent, field), name=field, copy=copy)
