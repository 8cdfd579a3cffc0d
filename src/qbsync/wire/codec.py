"""Control-message codec: ONE cattrs converter plus a tiny tagged binary encoding.

Why not JSON? Two control messages carry real binary payloads: ``InitTorrent.torrent_file``
(the raw .torrent, easily several MiB for big torrents) and ``InitResult.pieces_needed`` (a
bitfield of up to ~256 KiB). JSON would need base64 for them (+33 % on the wire, plus an
encode/decode pass), and it cannot tell ``bytes`` from ``str`` without a schema side channel.
msgpack/CBOR would do, but they are extra dependencies for ~100 lines of code. So:

* :data:`converter` (cattrs) turns attrs messages into plain trees of ``dict``/``list``/``str``/
  ``bytes``/``int``/``bool``/``None`` and back. It is configured *strictly*: ``"12"`` is not an
  int, ``True`` is not an int, a ``str`` is not a sequence, an unknown enum value is an error.
  Unknown *keys* are ignored so a newer peer can add optional fields (with defaults) without a
  protocol version bump; anything else that changes meaning bumps ``PROTOCOL_VERSION``.
* :func:`pack` / :func:`unpack` serialize such a tree with one tag byte per value, LEB128
  lengths and zig-zag varint integers (``bytes`` travel raw). The format is self-delimiting,
  linear-time to decode, never allocates more than the input size (every length is checked
  against the bytes actually present *before* slicing), limits nesting depth, and restricts
  integers to the signed 64-bit range, so hostile input can only ever produce a
  :class:`~qbsync.wire.errors.WireError` (the fuzz tests hold it to that).
* :func:`decode_message` decodes *against the message's schema* (:func:`schema_of`, read off
  the attrs classes): the value of an unknown key is walked and checked but never built, a
  container where the schema wants a scalar is refused at its tag, and the values that are
  built are capped at :data:`MAX_ITEMS` per message. Without this, 32 MiB of nested empty
  maps under an unknown key became tens of millions of ``dict`` objects (1.2 GiB) before the
  converter got to ignore them.

Piece payloads never go through here: see :mod:`qbsync.wire.frames`.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any

import attrs
import cattrs

from . import messages as m
from .errors import ErrorCode, WireError, leaf_exceptions

# --- frame type codes: read off messages.MESSAGE_TABLE ---------------------------------------

MESSAGE_TYPES: dict[int, type[Any]] = {
    spec.code: spec.cls for spec in m.MESSAGE_TABLE if spec.cls is not m.Piece
}  # control messages only: a Piece body never goes through the converter
TYPE_CODES: dict[type[Any], int] = {spec.cls: spec.code for spec in m.MESSAGE_TABLE}
KNOWN_TYPES: frozenset[int] = frozenset(TYPE_CODES.values())

# Named codes for the places that test or build frames by hand.
HELLO = TYPE_CODES[m.Hello]
AUTH = TYPE_CODES[m.Auth]
AUTH_OK = TYPE_CODES[m.AuthOk]
ERROR = TYPE_CODES[m.Error]
CREDIT_GRANT = TYPE_CODES[m.CreditGrant]
PING = TYPE_CODES[m.Ping]
PONG = TYPE_CODES[m.Pong]
INIT_TORRENT = TYPE_CODES[m.InitTorrent]
INIT_RESULT = TYPE_CODES[m.InitResult]
FINALIZE = TYPE_CODES[m.Finalize]
FINALIZE_RESULT = TYPE_CODES[m.FinalizeResult]
ABORT = TYPE_CODES[m.Abort]
ABORT_RESULT = TYPE_CODES[m.AbortResult]
START_TORRENT = TYPE_CODES[m.StartTorrent]
START_RESULT = TYPE_CODES[m.StartResult]
PIECE = TYPE_CODES[m.Piece]
PIECE_ACK = TYPE_CODES[m.PieceAck]


def type_name(code: int) -> str:
    """Human name of a frame type code, for error messages and logs."""
    spec = m.SPEC_BY_CODE.get(code)
    return spec.cls.__name__ if spec is not None else f"type-{code}"


# --- the converter --------------------------------------------------------------------------


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)

    def exact(kind: type[Any]) -> Callable[[Any, Any], Any]:
        def hook(value: Any, _: Any) -> Any:
            if type(value) is not kind:
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            return value

        return hook

    for kind in (int, str, bytes, bool):
        conv.register_structure_hook(kind, exact(kind))

    def enum_hook(value: Any, cls: type[enum.Enum]) -> Any:
        if type(value) is not str:
            raise TypeError(f"expected {cls.__name__} string, got {type(value).__name__}")
        return cls(value)  # ValueError for an unknown member

    # Registered per class: the StrEnums are str subclasses, and a class-registered hook (the
    # strict ``str`` one above) would otherwise win over a predicate hook.
    for enum_cls in (ErrorCode, m.Role, m.SyncStatus):
        conv.register_structure_hook(enum_cls, enum_hook)
        conv.register_unstructure_hook(enum_cls, lambda e: e.value)

    def is_homogeneous_tuple(t: Any) -> bool:
        args = typing.get_args(t)
        return typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis

    def tuple_factory(t: Any) -> Callable[[Any, Any], Any]:
        elem = typing.get_args(t)[0]

        def hook(value: Any, _: Any) -> Any:
            if type(value) is not list:
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return tuple(conv.structure(v, elem) for v in value)

        return hook

    conv.register_structure_hook_factory(is_homogeneous_tuple, tuple_factory)
    conv.register_unstructure_hook_func(
        is_homogeneous_tuple, lambda v: [conv.unstructure(x) for x in v]
    )
    return conv


converter: cattrs.Converter = _make_converter()
"""The one converter for every control message (see the module docstring)."""

for _cls in MESSAGE_TYPES.values():
    attrs.resolve_types(_cls)  # messages.py uses postponed annotations
attrs.resolve_types(m.FileEntry)


# --- the tagged binary encoding -------------------------------------------------------------

_T_NONE = 0
_T_FALSE = 1
_T_TRUE = 2
_T_INT = 3
_T_STR = 4
_T_BYTES = 5
_T_LIST = 6
_T_MAP = 7

MAX_DEPTH = 8  # messages nest at most 3 deep (InitTorrent -> files -> FileEntry)
# Values built per message: list elements plus map entries, skipped values not counted. A
# FileEntry as the source sends it is 6 (its list slot and its 5 fields), so this admits
# about 330,000 files, more than fit in MAX_INIT_TORRENT at a realistic path length, while a
# message of tiny entries can no longer cost more than a few hundred MiB of Python objects.
MAX_ITEMS = 2_000_000
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1


def _put_uvarint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def pack(value: Any) -> bytes:
    """Serialize a tree of ``dict[str, ...]``/``list``/``tuple``/``str``/``bytes``/``int``/
    ``bool``/``None``. Raises :class:`TypeError` or :class:`ValueError` for anything else (a
    local bug, never the peer's fault)."""
    out = bytearray()
    _pack(out, value, 0)
    return bytes(out)


def _pack(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("message nests too deeply")
    if value is None:
        out.append(_T_NONE)
    elif value is True:
        out.append(_T_TRUE)
    elif value is False:
        out.append(_T_FALSE)
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"integer {value} outside the signed 64-bit range")
        out.append(_T_INT)
        _put_uvarint(out, (value << 1) if value >= 0 else ((-value << 1) - 1))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_T_STR)
        _put_uvarint(out, len(raw))
        out += raw
    elif isinstance(value, bytes | bytearray | memoryview):
        out.append(_T_BYTES)
        _put_uvarint(out, len(value))
        out += value
    elif isinstance(value, list | tuple):
        out.append(_T_LIST)
        _put_uvarint(out, len(value))
        for item in value:
            _pack(out, item, depth + 1)
    elif isinstance(value, dict):
        out.append(_T_MAP)
        _put_uvarint(out, len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"map keys must be str, not {type(key).__name__}")
            _pack(out, key, depth + 1)
            _pack(out, item, depth + 1)
    else:
        raise TypeError(f"cannot pack {type(value).__name__}")


class _Reader:
    """Cursor over a body. Every length is checked against what is left before slicing, so a
    claimed length of 2**60 costs nothing."""

    __slots__ = ("data", "end", "items", "pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.end = len(self.data)
        self.items = 0  # list elements and map entries built so far (see MAX_ITEMS)

    def count(self, n: int) -> None:
        """Charge ``n`` values about to be built against :data:`MAX_ITEMS`."""
        self.items += n
        if self.items > MAX_ITEMS:
            raise self.fail(f"more than {MAX_ITEMS} values in one message")

    def fail(self, why: str) -> WireError:
        return WireError(ErrorCode.PROTOCOL, f"malformed message body: {why} at byte {self.pos}")

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.fail("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uvarint(self) -> int:
        result = 0
        for shift in range(0, 70, 7):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                if result > 2**64 - 1:
                    raise self.fail("varint overflow")
                return result
        raise self.fail("varint too long")

    def take(self, n: int) -> memoryview:
        if n > self.end - self.pos:
            raise self.fail(f"length {n} exceeds the {self.end - self.pos} bytes left")
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view


def unpack(body: bytes | bytearray | memoryview) -> Any:
    """Inverse of :func:`pack`. Raises only :class:`WireError` (code ``protocol``)."""
    reader = _Reader(body)
    value = _unpack(reader, 0)
    if reader.pos != reader.end:
        raise reader.fail(f"{reader.end - reader.pos} trailing bytes")
    return value


def _unpack(r: _Reader, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise r.fail("nesting too deep")
    tag = r.byte()
    if tag == _T_LIST:
        count = r.uvarint()
        if count > r.end - r.pos:  # every item takes at least one byte
            raise r.fail(f"list of {count} items cannot fit")
        r.count(count)
        return [_unpack(r, depth + 1) for _ in range(count)]
    if tag == _T_MAP:
        count = r.uvarint()
        if count * 2 > r.end - r.pos:
            raise r.fail(f"map of {count} entries cannot fit")
        r.count(count)
        result: dict[str, Any] = {}
        for _ in range(count):
            key = _unpack(r, depth + 1)
            if type(key) is not str:
                raise r.fail("map key is not a string")
            if key in result:
                raise r.fail(f"duplicate key {key!r}")
            result[key] = _unpack(r, depth + 1)
        return result
    return _scalar(r, tag)  # (one decoder of scalars for both paths; it rejects unknown tags)


# --- schema-driven decoding -----------------------------------------------------------------


class Leaf:
    """Schema of a scalar field (``int``, ``str``, ``bytes``, ``bool``, an enum, ``None``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Leaf"


class Anything:
    """Schema of a field whose shape the codec does not know: decoded as a whole tree (still
    depth-limited and charged to :data:`MAX_ITEMS`); the converter checks it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Anything"


LEAF: typing.Final = Leaf()
ANYTHING: typing.Final = Anything()


@attrs.frozen
class ListOf:
    """Schema of a homogeneous list (``tuple[X, ...]``)."""

    item: Schema


@attrs.frozen
class MapOf:
    """Schema of an attrs message: known keys (as UTF-8 bytes) -> their schemas. The value of
    any other key is skipped without being built."""

    fields: typing.Mapping[bytes, Schema]


Schema = Leaf | Anything | ListOf | MapOf

_LEAF_TYPES: tuple[type[Any], ...] = (int, str, bytes, bool, type(None), enum.Enum)


def schema_of(t: Any) -> Schema:
    """The decoding schema of a message type or field annotation (types already resolved)."""
    if attrs.has(t):
        return MapOf({f.name.encode(): schema_of(f.type) for f in attrs.fields(t)})
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return ListOf(schema_of(args[0]))
    if origin in (typing.Union, types.UnionType):
        parts = [schema_of(a) for a in args if a is not type(None)]
        if all(p is LEAF for p in parts):
            return LEAF
        if len(parts) == 1:
            return parts[0]  # Optional[X]: None is a scalar, always accepted at the tag
        return ANYTHING
    if isinstance(t, type) and issubclass(t, _LEAF_TYPES):
        return LEAF
    if t in (bytearray, memoryview):
        return LEAF
    return ANYTHING


def _scalar(r: _Reader, tag: int) -> Any:
    """Decode the scalar whose tag was just read, or fail for a container tag."""
    if tag == _T_NONE:
        return None
    if tag == _T_FALSE:
        return False
    if tag == _T_TRUE:
        return True
    if tag == _T_INT:
        z = r.uvarint()  # <= 2**64 - 1, so the zig-zag value is always a signed 64-bit int
        return (z >> 1) if not z & 1 else -((z + 1) >> 1)
    if tag == _T_STR:
        raw = r.take(r.uvarint())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise r.fail("invalid UTF-8") from None
    if tag == _T_BYTES:
        return bytes(r.take(r.uvarint()))
    if tag in (_T_LIST, _T_MAP):
        raise r.fail(f"found a {'list' if tag == _T_LIST else 'map'}, not a scalar")
    raise r.fail(f"unknown value tag {tag}")


def _unpack_schema(r: _Reader, schema: Schema, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise r.fail("nesting too deep")
    if schema is ANYTHING:
        return _unpack(r, depth)
    tag = r.byte()
    if tag not in (_T_LIST, _T_MAP) or schema is LEAF:
        return _scalar(r, tag)
    count = r.uvarint()
    if tag == _T_LIST:
        if not isinstance(schema, ListOf):
            raise r.fail("found a list, not a map")
        if count > r.end - r.pos:
            raise r.fail(f"list of {count} items cannot fit")
        r.count(count)
        return [_unpack_schema(r, schema.item, depth + 1) for _ in range(count)]
    if not isinstance(schema, MapOf):
        raise r.fail("found a map, not a list")
    if count * 2 > r.end - r.pos:
        raise r.fail(f"map of {count} entries cannot fit")
    result: dict[str, Any] = {}
    for _ in range(count):
        if r.byte() != _T_STR:
            raise r.fail("map key is not a string")
        raw_key = bytes(r.take(r.uvarint()))
        field = schema.fields.get(raw_key)
        if field is None:
            _skip(r, depth + 1)  # unknown key: checked, never built
            continue
        key = raw_key.decode()  # a known key: valid UTF-8 by construction
        if key in result:
            raise r.fail(f"duplicate key {key!r}")
        r.count(1)
        result[key] = _unpack_schema(r, field, depth + 1)
    return result


def _skip(r: _Reader, depth: int) -> None:
    """Walk one value without building it: the same framing checks as :func:`_unpack` (tags,
    lengths against the bytes left, varints, depth, string keys) but no objects, no UTF-8
    decoding and no duplicate-key check.

    Iterative and written for speed (locals, one-byte varints inline): a hostile body is
    32 MiB of two-byte values, so this loop's cost per tag is what a bomb buys."""
    data, pos, end = r.data, r.pos, r.end
    # Per open container: values still to walk (a map of n entries is 2n values, keys at
    # even counts left) and whether it is a map. The outermost slot is the value itself.
    remaining = [1]
    is_map = [False]
    try:
        while remaining:
            left = remaining[-1]
            if left == 0:
                remaining.pop()
                is_map.pop()
                continue
            remaining[-1] = left - 1
            if pos >= end:
                raise _Truncated
            tag = data[pos]
            pos += 1
            if is_map[-1] and not left & 1 and tag != _T_STR:
                r.pos = pos
                raise r.fail("map key is not a string")
            if tag <= _T_TRUE:
                continue
            if tag > _T_MAP:
                r.pos = pos
                raise r.fail(f"unknown value tag {tag}")
            # every other tag is followed by a varint
            if pos >= end:
                raise _Truncated
            n = data[pos]
            pos += 1
            if n & 0x80:
                r.pos = pos - 1
                n = r.uvarint()
                pos = r.pos
            if tag == _T_INT:
                continue
            if tag <= _T_BYTES:  # str, bytes: n raw bytes
                if n > end - pos:
                    r.pos = pos
                    raise r.fail(f"length {n} exceeds the {end - pos} bytes left")
                pos += n
                continue
            if depth + len(remaining) > MAX_DEPTH:
                r.pos = pos
                raise r.fail("nesting too deep")
            values = n if tag == _T_LIST else n * 2
            if values > end - pos:
                r.pos = pos
                raise r.fail(f"{'list' if tag == _T_LIST else 'map'} of {n} cannot fit")
            if values:
                remaining.append(values)
                is_map.append(tag == _T_MAP)
    except _Truncated:
        r.pos = pos
        raise r.fail("truncated") from None
    r.pos = pos


class _Truncated(Exception):
    """Internal to :func:`_skip`: ran off the end of the body."""


def unpack_as(body: bytes | bytearray | memoryview, schema: Schema) -> Any:
    """:func:`unpack` guided by ``schema``: unknown map keys are skipped (see the module
    docstring). Raises only :class:`WireError` (code ``protocol``)."""
    reader = _Reader(body)
    value = _unpack_schema(reader, schema, 0)
    if reader.pos != reader.end:
        raise reader.fail(f"{reader.end - reader.pos} trailing bytes")
    return value


SCHEMAS: dict[int, Schema] = {code: schema_of(cls) for code, cls in MESSAGE_TYPES.items()}
"""Decoding schema per control frame type (see :func:`unpack_as`)."""


# --- messages <-> bodies --------------------------------------------------------------------


def encode_message(msg: m.ControlMessage) -> tuple[int, bytes]:
    """``(frame type code, body)`` for a control message."""
    code = TYPE_CODES.get(type(msg))
    if code is None or code == PIECE:
        raise TypeError(f"{type(msg).__name__} is not a control message")
    return code, pack(converter.unstructure(msg))


def decode_message(code: int, body: bytes | bytearray | memoryview) -> m.ControlMessage:
    """Parse a control body. Raises only :class:`WireError`: ``unknown-type`` for a type code
    this version does not know, ``protocol`` for anything malformed."""
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {code}")
    tree = unpack_as(body, SCHEMAS[code])
    if type(tree) is not dict:
        raise WireError(ErrorCode.PROTOCOL, f"{cls.__name__} body is not a map")
    try:
        msg: m.ControlMessage = converter.structure(tree, cls)
    except Exception as exc:  # cattrs raises (grouped) TypeError/ValueError/KeyError
        raise WireError(ErrorCode.PROTOCOL, f"invalid {cls.__name__}: {_describe(exc)}") from None
    return msg


def _describe(exc: BaseException) -> str:
    """One short line for a (possibly grouped) cattrs validation error."""
    exc = leaf_exceptions(exc)[0]
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."
