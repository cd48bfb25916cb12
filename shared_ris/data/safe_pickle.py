"""Read the refer API's Python-2 pickles without letting them run code.

``refs(unc).p`` and friends are protocol-2 pickles of lists, dicts, strings and numbers. A pickle can
name any importable callable, so a plain ``pickle.load`` on a downloaded file would execute whatever
it names. This unpickler resolves only the few globals such data can need and refuses the rest.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

from .errors import DataError


class UnsafePickleError(DataError):
    """A pickle asked for a global outside the allowed containers; it is never imported."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"); allow exactly that call.
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed with latin-1, got {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None


def _to_text(value: Any) -> Any:
    """Python-2 byte strings → str (UTF-8, else latin-1), recursively through containers."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, dict):
        return {_to_text(k): _to_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_text(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(_to_text(v) for v in value)
    return value


def load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only containers, strings and numbers; byte strings come back as str.

    Raises:
        UnsafePickleError: the file names any other global (e.g. ``os.system``); nothing is run.
        DataError: the file is unreadable or not a pickle.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        value = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{path}: refused to load, the pickle asks for {exc} but a refs file holds only lists, dicts, "
            "strings and numbers; replace it with the original refer API file"
        ) from None
    except Exception as exc:  # truncated or not a pickle at all: any of a dozen exception types
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); re-download the refs file") from None
    return _to_text(value)
