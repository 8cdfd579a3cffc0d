"""Property tests of the schema-driven decoder (:func:`qbsync.wire.codec.unpack_as`).

Unknown keys are skipped without being built (finding 4 of issue 15: a 32 MiB body of nested
empty maps under an unknown key cost 1.2 GiB). The properties: skipping never changes what a
message decodes to, the skipper accepts everything the full decoder accepts and stops at the
same byte, and no input makes either raise anything but a ``protocol`` :class:`WireError`.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qbsync.wire import codec
from qbsync.wire.errors import ErrorCode, WireError

from .wire_helpers import MESSAGE_STRATEGIES, codec_trees

# Trees the codec can carry, nested at most 4 deep below the unknown key (the message itself
# and the unknown key's map take the rest of MAX_DEPTH).
trees = codec_trees(text=12, binary=24, key=6, max_leaves=20)

MESSAGE_CLASSES = sorted(MESSAGE_STRATEGIES, key=lambda c: c.__name__)


def _skip_end(body: bytes) -> int:
    reader = codec._Reader(body)
    codec._skip(reader, 0)
    return reader.pos


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=[c.__name__ for c in MESSAGE_CLASSES])
@given(
    data=st.data(),
    extra=st.dictionaries(st.text(min_size=1, max_size=10), trees, max_size=3),
)
def test_unknown_keys_never_change_the_message(cls: type, data: Any, extra: dict[str, Any]) -> None:
    msg = data.draw(MESSAGE_STRATEGIES[cls])
    tree = codec.converter.unstructure(msg)
    known = set(tree)
    tree.update({k: v for k, v in extra.items() if k not in known})
    code = codec.TYPE_CODES[cls]
    assert codec.decode_message(code, codec.pack(tree)) == msg


@given(trees)
def test_skip_consumes_exactly_one_value(tree: Any) -> None:
    body = codec.pack(tree)
    assert _skip_end(body + b"\x00") == len(body)


@given(st.binary(max_size=300))
def test_skip_accepts_whatever_the_full_decoder_accepts(body: bytes) -> None:
    try:
        full_end: int | None = None
        reader = codec._Reader(body)
        codec._unpack(reader, 0)
        full_end = reader.pos
    except WireError:
        pass
    try:
        skip_end: int | None = _skip_end(body)
    except WireError as exc:
        assert exc.code == ErrorCode.PROTOCOL
        skip_end = None
    if full_end is not None:
        assert skip_end == full_end


@given(st.sampled_from(sorted(codec.SCHEMAS)), st.binary(max_size=300))
def test_schema_decoding_raises_only_protocol_errors(code: int, body: bytes) -> None:
    try:
        codec.decode_message(code, body)
    except WireError as exc:
        assert exc.code == ErrorCode.PROTOCOL


@given(st.sampled_from(sorted(codec.SCHEMAS)), trees)
def test_schema_decoding_of_known_shapes_matches_full_decoding(code: int, tree: Any) -> None:
    """Whatever a tree is, decoding it against a schema either fails with ``protocol`` or
    gives the full decoder's tree minus the unknown keys."""
    body = codec.pack({"x": tree} if not isinstance(tree, dict) else tree)
    schema = codec.SCHEMAS[code]
    assert isinstance(schema, codec.MapOf)
    try:
        got = codec.unpack_as(body, schema)
    except WireError as exc:
        assert exc.code == ErrorCode.PROTOCOL
        return
    full = codec.unpack(body)
    assert got == {k: v for k, v in full.items() if k.encode() in schema.fields}
