"""KServe v2 gRPC messages (``inference.ModelInferRequest``/``ModelInferResponse``) ⇄ the
``v2codec.InferRequest`` and numpy arrays v2 REST uses. Pure: no I/O, no grpc.

Inputs come either all in ``raw_input_contents`` (one per input, in order: the binary tensor
layout of v2 REST, ``v2codec.decode_binary``) or each in its ``contents`` field of its datatype
(``bool_contents`` for BOOL, ``int_contents`` for INT8/16/32, …; FP16 has none). Outputs are
answered in ``raw_output_contents``, as Triton answers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import v2codec
from .errors import InvalidArgument, Unimplemented

# The InferTensorContents field of each datatype (kserve's grpc_predict_v2.proto).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    v2codec.BYTES: "bytes_contents",
}
MAX_DIMS = 32


def parameter(value: Any) -> bool | int | str | None:
    """An ``InferParameter``'s value (None when none of its fields is set)."""
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def parameters(params: Mapping[str, Any]) -> dict[str, bool | int | str | None]:
    return {key: parameter(value) for key, value in params.items()}


def _shape(dims: Any, name: str) -> tuple[int, ...]:
    shape = tuple(dims)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}' must have a 'shape' of at most {MAX_DIMS} "
                              f"non-negative dimensions, got {list(shape)}")
    return shape


def decode_contents(contents: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """One input's typed ``contents`` as an array of its datatype and shape."""
    field = CONTENTS.get(datatype)
    if field is None:
        if datatype in v2codec.DATATYPES:  # FP16: no typed field
            raise InvalidArgument(f"input '{name}': {datatype} data must be given in raw_input_contents")
        raise InvalidArgument(f"input '{name}': unsupported datatype '{datatype}' "
                              f"(one of {', '.join(v2codec.DATATYPES)})")
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise InvalidArgument(f"input '{name}': {datatype} values go in '{field}', "
                              f"not in '{others[0]}'")
    values = getattr(contents, field)
    if datatype == v2codec.BYTES:
        n = int(np.prod(shape, dtype=np.int64))
        if len(values) != n:
            raise InvalidArgument(f"input '{name}': shape {list(shape)} has {n} elements, "
                                  f"'{field}' has {len(values)}")
        out = np.empty(n, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    return v2codec.decode_json(list(values), datatype, shape, name)


def parse_infer(request: Any) -> v2codec.InferRequest:
    """A ModelInferRequest → InferRequest (v2 REST's: the core takes both alike)."""
    params = parameters(request.parameters)
    signature_name = params.get("signature_name") or ""
    if not isinstance(signature_name, str):
        raise InvalidArgument("parameter 'signature_name' must be a string")
    if not request.inputs:
        raise InvalidArgument("the request must have inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents must hold one entry per input: "
                              f"{len(request.inputs)} inputs, {len(raw)} raw_input_contents")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidArgument(f"input '{name}' is given more than once")
        if "shared_memory_region" in tensor.parameters:
            raise Unimplemented(f"input '{name}': shared memory is not supported")
        shape = _shape(tensor.shape, name)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input '{name}': 'contents' must not be given with "
                                      "raw_input_contents")
            inputs[name] = v2codec.decode_binary(memoryview(raw[i]), tensor.datatype, shape, name)
        else:
            inputs[name] = decode_contents(tensor.contents, tensor.datatype, shape, name)
        datatypes[name] = tensor.datatype

    outputs: dict[str, bool | None] | None = None
    if request.outputs:
        outputs = {}
        for output in request.outputs:
            if output.name in outputs:
                raise InvalidArgument(f"output '{output.name}' is requested more than once")
            if "classification" in output.parameters:
                raise Unimplemented(f"output '{output.name}': the classification extension is "
                                    "not supported")
            if "shared_memory_region" in output.parameters:
                raise Unimplemented(f"output '{output.name}': shared memory is not supported")
            outputs[output.name] = None
    return v2codec.InferRequest(inputs, datatypes, request.id or None, signature_name,
                                False, outputs, params)


def encode_infer(response: Any, model_name: str, version: int, request: v2codec.InferRequest,
                 outputs: Mapping[str, np.ndarray]) -> Any:
    """Fill a ModelInferResponse: the requested outputs in the request's order, else all by name
    (v2 REST's order), each in ``raw_output_contents``."""
    response.model_name = model_name
    response.model_version = str(version)
    if request.id is not None:
        response.id = request.id
    names = list(request.outputs) if request.outputs is not None else sorted(outputs)
    for name in names:
        arr = outputs[name]
        datatype = v2codec.datatype_of(arr.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(v2codec.encode_binary(arr, datatype))
    return response


def tensor_metadata(response_tensors: Any, tensors: Mapping[str, Any]) -> None:
    """A signature_def's inputs or outputs as ``ModelMetadataResponse.TensorMetadata`` (v2 REST's)."""
    for meta in v2codec.tensor_metadata(tensors):
        response_tensors.add(name=meta["name"], datatype=meta["datatype"], shape=meta["shape"])
