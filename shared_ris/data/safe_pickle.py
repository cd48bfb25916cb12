"""Read the refer API's Python-2 pickles without letting them run code or claim memory they do not spell out.

``refs(unc).p`` and friends are protocol-2 pickles of lists, dicts, strings and numbers. A pickle can
name any importable callable, so a plain ``pickle.load`` on a downloaded file would execute whatever
it names. This unpickler resolves only the globals such data needs, and accepts from each only the
call a genuine file makes, so no call can build more than the pickle itself spells out:

- ``set([...])`` / ``frozenset([...])``: how protocol 2 writes a set (Python 2 and 3);
- ``bytes()`` with no argument: how Python 3 writes ``b""`` at protocol 2 (``bytes(N)`` would be N zero bytes);
- ``_codecs.encode(text, "latin1")``: how Python 3 writes other ``bytes`` at protocol 2 (as long as ``text``).

Opcodes a plain-data pickle never holds (object state, extension codes, persistent ids, protocol-5
buffers) are refused too. Byte strings are decoded as they are read (UTF-8, else latin-1), so every
reference to one string shares one ``str``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable

from .errors import DataError, short_repr


class UnsafePickleError(DataError):
    """A pickle asked for a global, a call or an opcode that plain data never needs; nothing was run."""


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(short_repr(a) for a in args)})"


def _empty_bytes(*args: Any) -> str:
    if args:  # bytes(10**9) is a gigabyte of zeros from a 35-byte file
        raise UnsafePickleError(_call("bytes", args))
    return ""


def _latin1_encode(*args: Any) -> str:
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise UnsafePickleError(_call("_codecs.encode", args))
    try:
        return _text(args[0].encode("latin1"))
    except UnicodeEncodeError:
        raise UnsafePickleError(_call("_codecs.encode", args) + " of text that is not latin-1") from None


def _from_list(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        # the list was spelled out item by item in the pickle; any other argument (a string, ...) is not how sets are written
        if len(args) != 1 or type(args[0]) is not list:
            raise UnsafePickleError(_call(kind.__name__, args))
        return kind(args[0])

    return build


# Plain functions, never the types themselves: NEWOBJ would call ``bytes.__new__(bytes, N)`` past any check.
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {}
for _module in ("__builtin__", "builtins"):  # Python 2 names, and Python 3's with fix_imports=False
    _ALLOWED[(_module, "set")] = _from_list(set)
    _ALLOWED[(_module, "frozenset")] = _from_list(frozenset)
    _ALLOWED[(_module, "bytes")] = _empty_bytes
_ALLOWED[("_codecs", "encode")] = _latin1_encode
del _module

# Opcodes lists, dicts, strings, numbers and sets never need: each could build or alter an object
# another way (BUILD sets attributes, EXT* reads the process-wide copyreg cache, BYTEARRAY8
# allocates its declared length before reading it).
_REFUSED_OPCODES = {
    "PERSID": "a persistent id", "BINPERSID": "a persistent id", "INST": "an object instance", "OBJ": "an object instance",
    "NEWOBJ": "an object instance", "NEWOBJ_EX": "an object instance", "BUILD": "setting an object's state",
    "EXT1": "a copyreg extension", "EXT2": "a copyreg extension", "EXT4": "a copyreg extension",
    "BYTEARRAY8": "a bytearray", "NEXT_BUFFER": "an out-of-band buffer", "READONLY_BUFFER": "an out-of-band buffer",
}


def _refuse(name: str, what: str) -> Callable[[Any], None]:
    def load(self: Any) -> None:
        raise UnsafePickleError(f"opcode {name} ({what})")

    return load


def _decoding(load: Callable[[Any], None]) -> Callable[[Any], None]:
    def load_as_text(self: Any) -> None:
        load(self)
        self.stack[-1] = _text(self.stack[-1])

    return load_as_text


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler: its memo is a dict. The C one grows an array to twice the largest
    index a PUT names, so a 9-byte pickle (LONG_BINPUT 100000000) would take 1.5 GB."""

    dispatch = dict(pickle._Unpickler.dispatch)
    for _name, _what in _REFUSED_OPCODES.items():
        dispatch[getattr(pickle, _name)[0]] = _refuse(_name, _what)
    for _name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):  # protocol 3+ bytes
        dispatch[getattr(pickle, _name)[0]] = _decoding(pickle._Unpickler.dispatch[getattr(pickle, _name)[0]])
    del _name, _what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None

    def _decode_string(self, value: bytes) -> str:  # Python 2 str (STRING, BINSTRING, SHORT_BINSTRING)
        return _text(value)


def load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only containers, strings and numbers; byte strings come back as str.

    Raises:
        UnsafePickleError: the file names any other global (e.g. ``os.system``), calls an allowed one
            in a way no genuine file does (``bytes(10**9)``), or holds an object-building opcode;
            nothing is run.
        DataError: the file is unreadable or not a pickle.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{path}: refused to load, the pickle asks for {exc} but a refs file holds only lists, dicts, "
            "strings and numbers; replace it with the original refer API file"
        ) from None
    except Exception as exc:  # truncated or not a pickle at all: any of a dozen exception types
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        detail = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
        raise DataError(f"{path}: not a readable pickle ({detail}); re-download the refs file") from None
