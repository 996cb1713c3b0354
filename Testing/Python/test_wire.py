"""Wire format: volume streams and mask bundles round-trip exactly; every malformed payload is a WireError."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.results import LesionMask
from LesionLocatorLib.serve.wire import (
    MIN_CHUNK_BYTES,
    PayloadTooLarge,
    VolumeDecoder,
    WireError,
    content_hash,
    decode_mask_prompt,
    decode_masks,
    decode_volume,
    encode_mask_prompt,
    encode_masks,
    encode_volume,
    iter_encode_volume,
)


def ct_like(shape=(20, 64, 48), seed=0, dtype=np.int16) -> Volume:
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, dtype=np.int32)
    zz, yy, xx = np.indices(shape)
    body = ((yy - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((xx - shape[2] / 2) / (shape[2] * 0.4)) ** 2 < 1
    arr[body] = 40
    arr += rng.integers(-20, 20, size=shape)
    direction = np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    return Volume(arr.astype(dtype), spacing=(2.5, 0.7, 0.8), origin=(-10.0, 20.5, 3.0), direction=direction)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int32, ">i2"])
def test_volume_round_trip_exact(dtype):
    vol = ct_like(dtype=dtype)
    data = encode_volume(vol, chunk_bytes=MIN_CHUNK_BYTES)  # several frames
    out, digest = decode_volume(data)
    assert digest == content_hash(vol)
    assert out.shape == vol.shape
    np.testing.assert_array_equal(out.array, vol.array)
    assert out.array.dtype.kind == np.dtype(dtype).kind
    assert out.spacing == vol.spacing and out.origin == vol.origin
    np.testing.assert_array_equal(out.direction, vol.direction)


def test_hash_changes_with_voxels_and_geometry():
    a = ct_like()
    h = content_hash(a)
    b = Volume(a.array.copy(), a.spacing, a.origin, a.direction)
    assert content_hash(b) == h
    b.array[3, 4, 5] += 1
    assert content_hash(b) != h
    c = Volume(a.array, (2.5, 0.7, 0.81), a.origin, a.direction)
    assert content_hash(c) != h
    # byte order must not change the identity of the scan
    d = Volume(a.array.astype(">i2"), a.spacing, a.origin, a.direction)
    assert content_hash(d) == h


def test_streaming_feed_in_small_pieces_and_threads():
    vol = ct_like(shape=(10, 70, 60), seed=3)
    data = b"".join(iter_encode_volume(vol, chunk_bytes=MIN_CHUNK_BYTES, threads=2))
    assert data == encode_volume(vol, chunk_bytes=MIN_CHUNK_BYTES)  # threads keep the order
    dec = VolumeDecoder()
    for i in range(0, len(data), 777):
        dec.feed(data[i:i + 777])
    out, _ = dec.finish()
    np.testing.assert_array_equal(out.array, vol.array)


def test_bad_dtype_and_shape_rejected_on_encode_and_decode():
    with pytest.raises(WireError, match="unsupported voxel type"):
        encode_volume(Volume(np.zeros((2, 2, 2), np.complex64)))
    with pytest.raises(WireError, match="unsupported voxel type"):
        encode_volume(Volume(np.zeros((2, 2, 2), np.int64)))
    good = encode_volume(ct_like(shape=(2, 3, 4)))
    hlen = struct.unpack_from("<I", good, 4)[0]
    import json

    header = json.loads(good[8:8 + hlen])
    for key, bad in [("dtype", "<c8"), ("dtype", "|O"), ("shape", [2, 3]), ("shape", [2, 3, -4]),
                     ("shape", [2, 3, 4.0]), ("raw_nbytes", 7), ("spacing", [0, 1, 1]),
                     ("direction", [1, 0, 0, 0, 1, 0, 0, 0, 5]), ("chunk_bytes", 3), ("hash", "x")]:
        h = dict(header, **{key: bad})
        body = json.dumps(h).encode()
        with pytest.raises(WireError):
            decode_volume(b"LLV1" + struct.pack("<I", len(body)) + body + good[8 + hlen:])


def test_corrupt_truncated_and_oversized():
    vol = ct_like()
    data = encode_volume(vol)
    with pytest.raises(WireError, match="magic"):
        decode_volume(b"XXXX" + data[4:])
    for cut in (3, 8, 50, len(data) // 2, len(data) - 1):
        with pytest.raises(WireError, match="truncated|corrupt"):
            decode_volume(data[:cut])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(WireError):
        decode_volume(bytes(flipped))
    with pytest.raises(WireError, match="after the end"):
        decode_volume(data + b"\0")
    with pytest.raises(PayloadTooLarge, match="voxels"):
        decode_volume(data, max_voxels=100)
    dec = VolumeDecoder(max_stream_bytes=100)
    with pytest.raises(PayloadTooLarge, match="limit"):
        dec.feed(data)


def test_hash_mismatch_is_corrupt():
    a, b = ct_like(seed=1), ct_like(seed=2)
    data = b"".join(iter_encode_volume(a, volume_hash=content_hash(b)))
    with pytest.raises(WireError, match="hash mismatch"):
        decode_volume(data)


def _lesion(lid, shape, seed):
    rng = np.random.default_rng(seed)
    z0, y0, x0 = (int(rng.integers(0, s - 5)) for s in shape)
    bbox = (z0, z0 + 5, y0, y0 + 3, x0, x0 + 4)
    return LesionMask(lid, bbox, rng.random((5, 3, 4)) > 0.5, status="found", center_voxel=(1.5, 2.0, 3.25))


def test_mask_bundle_round_trip():
    shape = (20, 30, 40)
    les = [_lesion(1, shape, 0), _lesion(300, shape, 1),
           LesionMask(7, (3, 3, 4, 4, 5, 5), np.zeros((0, 0, 0), bool), status="not found")]
    data = encode_masks(les, shape=shape, extra={"history": 2}, per_lesion={1: {"changed_bbox": [0, 1, 0, 1, 0, 1]}})
    out = decode_masks(data)
    assert out.header["history"] == 2 and out.entries[1]["changed_bbox"] == [0, 1, 0, 1, 0, 1]
    assert set(out.lesions) == {1, 300, 7}
    for orig in les:
        got = out.lesions[orig.lesion_id]
        assert got.bbox == orig.bbox and got.status == orig.status
        np.testing.assert_array_equal(got.full(shape), orig.full(shape))
    assert out.lesions[1].center_voxel == (1.5, 2.0, 3.25)


def test_mask_bundle_rejects_bad_input():
    shape = (20, 30, 40)
    data = encode_masks([_lesion(1, shape, 0)], shape=shape)
    with pytest.raises(WireError):
        decode_masks(data[:-3])
    with pytest.raises(WireError):
        decode_masks(b"LLV1" + data[4:])
    with pytest.raises(WireError, match="outside"):
        encode_masks([LesionMask(1, (18, 23, 0, 3, 0, 4), np.ones((5, 3, 4), bool))], shape=shape)
    with pytest.raises(WireError, match="does not match"):
        encode_masks([LesionMask(1, (0, 5, 0, 3, 0, 4), np.ones((5, 3, 3), bool))], shape=shape)


def test_mask_prompt_round_trip_and_errors():
    shape = (12, 16, 20)
    m = np.zeros(shape, np.uint8)
    m[3:7, 4:9, 10:12] = 1
    m[5, 5, 5] = 1
    obj = encode_mask_prompt(m)
    np.testing.assert_array_equal(decode_mask_prompt(obj, shape), m)
    with pytest.raises(WireError, match="empty"):
        encode_mask_prompt(np.zeros(shape))
    with pytest.raises(WireError, match="outside"):
        decode_mask_prompt(obj, (4, 4, 4))
    with pytest.raises(WireError, match="base64"):
        decode_mask_prompt({"bbox": obj["bbox"], "data": "!!!"}, shape)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(0, 400))
def test_fuzz_decoders_only_raise_wire_errors(junk, cut):
    """Random bytes, and valid streams with random splices, never crash the decoders with anything but WireError."""
    valid = encode_volume(ct_like(shape=(2, 3, 4)))
    for data in (junk, b"LLV1" + junk, valid[:cut] + junk, valid[:8] + junk):
        try:
            decode_volume(data, max_voxels=10_000)
        except WireError:
            pass
    masks = encode_masks([_lesion(1, (20, 30, 40), 0)], shape=(20, 30, 40))
    for data in (junk, b"LLM1" + junk, masks[:cut] + junk):
        try:
            decode_masks(data, max_raw_bytes=10_000)
        except WireError:
            pass


def test_two_level_hash_over_several_blocks():
    """Volumes above one hash block: threaded and serial hashing agree, frames need not align with blocks."""
    from LesionLocatorLib.serve.wire import HASH_CHUNK_BYTES

    rng = np.random.default_rng(5)
    vol = Volume(rng.integers(-1000, 1000, size=(19, 300, 1000), dtype=np.int16))  # 11.4 MB: two blocks
    assert vol.array.nbytes > HASH_CHUNK_BYTES
    h1 = content_hash(vol, threads=1)
    assert content_hash(vol, threads=4) == h1
    data = encode_volume(vol, chunk_bytes=3 * 2**20 + 17)
    out, digest = decode_volume(data)
    assert digest == h1
    np.testing.assert_array_equal(out.array, vol.array)
    vol.array[18, 299, 999] += 1  # the very last voxel is covered by the hash
    assert content_hash(vol) != h1


def test_mask_bundle_with_probabilities():
    shape = (20, 30, 40)
    les = _lesion(2, shape, 3)
    les.probability = np.random.default_rng(0).random(les.mask.shape).astype(np.float32)
    out = decode_masks(encode_masks([les, _lesion(5, shape, 4)], shape=shape))
    np.testing.assert_array_equal(out.lesions[2].probability, les.probability)
    assert out.lesions[5].probability is None
    np.testing.assert_array_equal(out.lesions[5].full(shape), _lesion(5, shape, 4).full(shape))
    with pytest.raises(WireError, match="probability shape"):
        bad = _lesion(2, shape, 3)
        bad.probability = np.zeros((1, 1, 1), np.float32)
        encode_masks([bad], shape=shape)
