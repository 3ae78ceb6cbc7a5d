"""Open Inference Protocol tensors, both ways: one definition for ``sealtorch serve`` and the
KServe predictor (``sealtorch.kserve``).

A model's signature is a list of named :class:`TensorSpec` inputs (datatype and per-sample shape;
the batch is the first dimension of every input). A request is checked against it input by input
(:func:`check_input`, :func:`input_value`); ``sealtorch serve`` also parses the HTTP body here
(:func:`decode_request`: JSON, and the binary tensor data extension, where the JSON header is
followed by raw tensor bytes and its length is sent in ``Inference-Header-Content-Length``) and
writes the answer (:func:`encode_response`). ``BYTES`` tensors are numpy object arrays of
``bytes`` (length-prefixed on the wire, UTF-8 strings in JSON); every other datatype is a torch
tensor. Messages say what was wrong without echoing the input.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from sealtorch.errors import InferenceInputError, ServeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the request header that announces the binary tensor data extension
HEADER_LENGTH = "inference-header-content-length"
MAX_ID_LEN = 128
#: OIP datatype -> numpy dtype, for the fixed-size datatypes (``BYTES`` is separate)
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP64": np.float64,
}
DATATYPES = (*NUMPY_DTYPES, "BYTES")
#: a BYTES element counts as this many bytes when a body limit is derived from a signature
BYTES_ELEMENT_ALLOWANCE = 4096
#: "model_name"/"model_version" are not in the protocol's request, but KServe's own client sends
#: them; they are checked to be short strings and otherwise ignored (the URL names the model)
_REQUEST_KEYS = {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
_INPUT_KEYS = {"name", "shape", "datatype", "data", "parameters"}
_OUTPUT_KEYS = {"name", "parameters"}

#: one input or output value: a torch tensor, or a numpy object array of bytes (BYTES)
Value = Union["torch.Tensor", np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model: its OIP datatype and per-sample shape (no batch dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64 or not self.name.isprintable():
            raise ServeError("an input name must be 1-64 printable characters")
        if self.datatype not in DATATYPES:
            raise ServeError(f"datatype must be one of {', '.join(DATATYPES)}")
        if any(not isinstance(d, int) or d <= 0 for d in self.shape):
            raise ServeError("a per-sample shape must be a list of positive sizes, e.g. "
                             "3,224,224")

    @property
    def elements(self) -> int:
        """Values in one sample."""
        return math.prod(self.shape)

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample takes in a binary request (BYTES: an allowance per element)."""
        if self.datatype == "BYTES":
            return self.elements * BYTES_ELEMENT_ALLOWANCE
        return self.elements * np.dtype(NUMPY_DTYPES[self.datatype]).itemsize

    def to_dict(self) -> dict[str, Any]:
        """The model metadata entry of this input (``-1``: the batch dimension)."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}


def datatype_of(value: Value) -> str:
    """The OIP datatype of a model output (a torch tensor, or a numpy array of bytes)."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return "BYTES"
        dtype = value.dtype
    else:
        try:
            dtype = np.dtype(str(value.dtype).removeprefix("torch."))
        except TypeError:  # bfloat16 and other dtypes numpy does not have
            dtype = None
    for name, np_dtype in NUMPY_DTYPES.items():
        if dtype == np.dtype(np_dtype):
            return name
    raise ServeError(f"the model's output dtype {value.dtype} has no Open Inference Protocol "
                     f"datatype this server carries ({', '.join(DATATYPES)})")


def check_input(spec: TensorSpec, *, datatype: object, shape: object, max_batch: int) -> int:
    """Check one request tensor's datatype and shape against ``spec``; return its rows."""
    if datatype != spec.datatype:
        raise InferenceInputError(f"wrong datatype for input {spec.name!r}; this model takes "
                                  f"{spec.datatype}")
    want = ", ".join(map(str, spec.shape))
    if (not isinstance(shape, list | tuple) or len(shape) != len(spec.shape) + 1
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or tuple(shape[1:]) != spec.shape):
        raise InferenceInputError(f"wrong shape for input {spec.name!r}; expected "
                                  f"[batch, {want}]")
    if not 1 <= shape[0] <= max_batch:
        raise InferenceInputError(f"batch size must be between 1 and {max_batch}")
    return int(shape[0])


def input_value(spec: TensorSpec, array: np.ndarray, rows: int) -> Value:
    """The model's view of a checked input: a tensor (fixed-size types) or bytes (BYTES)."""
    import torch

    shape = (rows, *spec.shape)
    if spec.datatype == "BYTES":
        out = np.empty(shape, dtype=object)
        flat = array.reshape(-1)
        if flat.size != out.size or not all(isinstance(v, bytes) for v in flat):
            raise InferenceInputError(f"input {spec.name!r} must hold {out.size} strings")
        out.reshape(-1)[:] = flat
        return out
    array = np.ascontiguousarray(array.reshape(shape))
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _reject_constant(name: str) -> float:
    raise InferenceInputError("JSON numbers must be finite (NaN/Infinity are not allowed)")


def _json_array(spec: TensorSpec, data: object, shape: list[int]) -> np.ndarray:
    """A JSON ``data`` list (flat or nested) as an array of ``spec``'s datatype."""
    n = math.prod(shape)
    if not isinstance(data, list):
        raise InferenceInputError("'data' must be a list (flat or nested)")
    if spec.datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1) if data else np.empty(0, dtype=object)
        if flat.size != n or not all(isinstance(v, str) for v in flat):
            raise InferenceInputError(f"'data' of BYTES input {spec.name!r} must be {n} "
                                      "strings")
        return np.array([v.encode("utf-8") for v in flat], dtype=object)
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise InferenceInputError("'data' must be a rectangular list of numbers") from None
    if arr.dtype.kind not in ("b" if spec.datatype == "BOOL" else "fiu"):
        raise InferenceInputError("'data' must contain only numbers"
                                  if spec.datatype != "BOOL" else "'data' must be booleans")
    if arr.size != n or (arr.ndim > 1 and list(arr.shape) != shape):
        raise InferenceInputError(f"'data' has the wrong number of values for shape; expected "
                                  f"{n}")
    np_dtype = np.dtype(NUMPY_DTYPES[spec.datatype])
    if arr.dtype.kind == "f" and np_dtype.kind in "iu":
        raise InferenceInputError(f"wrong datatype; this model takes {spec.datatype} values")
    with np.errstate(over="ignore", invalid="ignore"):
        conv = arr.astype(np_dtype).reshape(shape)
    if conv.dtype.kind == "f" and not np.isfinite(conv).all():
        raise InferenceInputError(f"values out of range for {spec.datatype}")
    if conv.dtype.kind in "iu" and not np.array_equal(conv, arr.reshape(shape)):
        raise InferenceInputError(f"values out of range for {spec.datatype}")
    return conv


def _binary_array(spec: TensorSpec, raw: bytes, shape: list[int]) -> np.ndarray:
    """Raw tensor bytes (the binary extension) as an array of ``spec``'s datatype."""
    n = math.prod(shape)
    if spec.datatype == "BYTES":
        items, off = [], 0
        while off < len(raw):
            if off + 4 > len(raw):
                raise InferenceInputError(f"binary BYTES input {spec.name!r} is truncated")
            (size,) = struct.unpack_from("<I", raw, off)
            if off + 4 + size > len(raw):
                raise InferenceInputError(f"binary BYTES input {spec.name!r} is truncated")
            items.append(raw[off + 4:off + 4 + size])
            off += 4 + size
        if len(items) != n:
            raise InferenceInputError(f"binary BYTES input {spec.name!r} must hold {n} strings")
        return np.array(items, dtype=object) if items else np.empty(0, dtype=object)
    np_dtype = np.dtype(NUMPY_DTYPES[spec.datatype])
    if len(raw) != n * np_dtype.itemsize:
        raise InferenceInputError(f"binary data of input {spec.name!r} has the wrong size; "
                                  f"expected {n * np_dtype.itemsize} bytes for its shape")
    return np.frombuffer(raw, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(shape)


@dataclass
class Decoded:
    """A checked request: its id, one value per model input (signature order), the rows, which
    outputs to answer (``None``: all) and which of them as binary data."""

    id: str | None
    values: list[Value]
    rows: int
    outputs: list[str] | None = None
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False

    def wants_binary(self, name: str) -> bool:
        """Whether output ``name`` goes back as binary data."""
        return self.binary.get(name, self.binary_default)


def _binary_flag(params: object, key: str) -> bool | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InferenceInputError("'parameters' must be a JSON object")
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise InferenceInputError(f"parameter {key!r} must be true or false")
    return value


def decode_request(body: bytes, signature: Sequence[TensorSpec], *, max_batch: int,
                   header_length: str | None = None,
                   output_names: Sequence[str] = ()) -> Decoded:
    """Parse and check an OIP infer request body (JSON, or a JSON header of ``header_length``
    bytes followed by binary tensor data) against ``signature``."""
    json_part, tail = body, b""
    if header_length is not None:
        if not header_length.isdigit() or len(header_length) > 15 \
                or int(header_length) > len(body):
            raise InferenceInputError(f"the {HEADER_LENGTH} header must be the length of the "
                                      "JSON part of the body")
        json_part, tail = body[:int(header_length)], body[int(header_length):]
    try:
        doc = json.loads(json_part, parse_constant=_reject_constant)
    except InferenceInputError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InferenceInputError("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InferenceInputError("the request must be a JSON object with an 'inputs' list")
    if set(doc) - _REQUEST_KEYS:
        raise InferenceInputError(f"unknown request field(s); allowed: {sorted(_REQUEST_KEYS)}")
    rid = doc.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID_LEN
                            or not rid.isprintable()):
        raise InferenceInputError(f"'id' must be a printable string of at most {MAX_ID_LEN} "
                                  "characters")
    for key in ("model_name", "model_version"):
        if key in doc and (not isinstance(doc[key], str) or len(doc[key]) > 64):
            raise InferenceInputError(f"{key!r} must be a string of at most 64 characters")
    names = [s.name for s in signature]
    inputs = doc.get("inputs")
    if (not isinstance(inputs, list) or len(inputs) != len(signature)
            or not all(isinstance(i, dict) for i in inputs)):
        raise InferenceInputError(f"'inputs' must be a list with exactly one tensor for each "
                                  f"of this model's inputs: {names}")
    by_name: dict[str, dict[str, Any]] = {}
    for inp in inputs:
        if set(inp) - _INPUT_KEYS or not {"name", "shape", "datatype"} <= set(inp):
            raise InferenceInputError("an input tensor needs 'name', 'shape', 'datatype' and "
                                      "'data' (or binary data), and optional 'parameters'")
        if inp["name"] not in names or inp["name"] in by_name:
            raise InferenceInputError(f"unknown or repeated input name; this model's inputs "
                                      f"are {names}")
        by_name[inp["name"]] = inp
    values, rows, offset = [], None, 0
    for inp in inputs:  # binary data follows the header in the order of the request's inputs
        spec = signature[names.index(inp["name"])]
        n = check_input(spec, datatype=inp["datatype"], shape=inp["shape"], max_batch=max_batch)
        if rows is not None and n != rows:
            raise InferenceInputError("every input must have the same batch size")
        rows = n
        params = inp.get("parameters")
        _binary_flag(params, "binary_data")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if "data" in inp or header_length is None:
                raise InferenceInputError("an input with 'binary_data_size' has no 'data' and "
                                          f"needs the {HEADER_LENGTH} header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
                    or offset + size > len(tail):
                raise InferenceInputError(f"'binary_data_size' of input {spec.name!r} does "
                                          "not match the binary data sent")
            arr = _binary_array(spec, tail[offset:offset + size], inp["shape"])
            offset += size
        elif "data" in inp:
            arr = _json_array(spec, inp["data"], inp["shape"])
        else:
            raise InferenceInputError(f"input {spec.name!r} has neither 'data' nor "
                                      "'binary_data_size'")
        values.append((names.index(spec.name), input_value(spec, arr, n)))
    if offset != len(tail):
        raise InferenceInputError("the body holds more binary data than the inputs declare")
    out = Decoded(id=rid, values=[v for _, v in sorted(values, key=lambda p: p[0])],
                  rows=rows or 0)
    flag = _binary_flag(doc.get("parameters"), "binary_data_output")
    out.binary_default = bool(flag)
    if doc.get("outputs") is not None:
        requested = doc["outputs"]
        if not isinstance(requested, list) or not all(
                isinstance(o, dict) and not set(o) - _OUTPUT_KEYS and "name" in o
                for o in requested):
            raise InferenceInputError("'outputs' must be a list of {'name', 'parameters'}")
        out.outputs = []
        for o in requested:
            if o["name"] not in output_names or o["name"] in out.outputs:
                raise InferenceInputError(f"unknown or repeated output name; this model's "
                                          f"outputs are {list(output_names)}")
            out.outputs.append(o["name"])
            if (b := _binary_flag(o.get("parameters"), "binary_data")) is not None:
                out.binary[o["name"]] = b
    return out


def _json_data(value: Value) -> list[Any]:
    if isinstance(value, np.ndarray) and value.dtype == object:
        try:
            return [bytes(v).decode("utf-8") for v in value.reshape(-1)]
        except UnicodeDecodeError:
            raise InferenceInputError("a BYTES output is not UTF-8; ask for it as binary data "
                                      "(binary_data: true)") from None
    return value.reshape(-1).tolist()


def _raw(value: Value) -> bytes:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return b"".join(struct.pack("<I", len(v)) + bytes(v) for v in value.reshape(-1))
    arr = value if isinstance(value, np.ndarray) else value.contiguous().numpy()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def encode_response(*, model_name: str, model_version: str, request: Decoded,
                    outputs: Sequence[tuple[str, Value]]) -> tuple[bytes, int | None]:
    """The answer body and, when any output is binary, the length of its JSON header."""
    items, tails = [], []
    for name, value in outputs:
        if request.outputs is not None and name not in request.outputs:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(value),
                                 "shape": list(value.shape)}
        if request.wants_binary(name):
            raw = _raw(value)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            entry["data"] = _json_data(value)
        items.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version,
                           "outputs": items}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not tails:
        return header, None
    return header + b"".join(tails), len(header)
