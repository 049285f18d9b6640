"""What the core needs of a loaded model, as TensorFlow-free Protocols, so mypy checks the hot path.

``servable.Servable`` and ``servable.Signature`` implement them with TensorFlow; the unit tests'
fakes implement them with numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import numpy as np

from .errors import InvalidArgument

Tensors = dict[str, np.ndarray]


class Signature(Protocol):
    """One signature of a servable: its name, typed inputs and outputs, and how to run it."""

    name: str
    method_name: str
    inputs: dict[str, np.dtype]
    outputs: dict[str, np.dtype]

    def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> Tensors: ...


DEFAULT_SIGNATURE = "serving_default"
S = TypeVar("S")


def signature_by_name(signatures: Mapping[str, S], name: str) -> S:
    """A servable's signature by name ("" is ``serving_default``), or TF Serving's error."""
    key = name or DEFAULT_SIGNATURE
    sig = signatures.get(key)
    if sig is None:
        raise InvalidArgument(f'Serving signature name: "{key}" not found in signature def')
    return sig


class Servable(Protocol):
    """One loaded version of a model (TF Serving's servable)."""

    name: str
    version: int
    takes_dense: bool  # some signature has one floating-point input (the dense JSON decoder)

    @property
    def signature_def_map(self) -> dict[str, Any]: ...

    def signature(self, name: str) -> Signature: ...

    def classify(self, name: str, examples: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]: ...

    def regress(self, name: str, examples: np.ndarray) -> np.ndarray: ...
