"""The one wire container: volumes, mask replies and request bodies round-trip exactly; every malformed or
over-limit payload is a WireError, raised before the decoder allocates what the payload only claims."""
from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.prompts import Box, Mask, Point, parse_prompts, prompts_to_json
from LesionLocatorLib.core.results import LesionMask, LesionStatus
from LesionLocatorLib.serve.wire import (
    HASH_CHUNK_BYTES,
    MAGIC,
    MIN_CHUNK_BYTES,
    PayloadTooLarge,
    StreamDecoder,
    WireError,
    content_hash,
    decode,
    decode_results,
    decode_volume,
    encode,
    encode_request,
    encode_results,
    encode_volume,
    iter_encode_volume,
    request_of,
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


def split(data: bytes):
    """(header dict, rest after the header) of a container."""
    hlen = struct.unpack_from("<I", data, 4)[0]
    return json.loads(data[8:8 + hlen]), data[8 + hlen:]


def join(header: dict, rest: bytes) -> bytes:
    body = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(body)) + body + rest


# ----------------------------------------------------------------------------------------
# volumes
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int32, ">i2"])
def test_volume_round_trip_exact(dtype):
    vol = ct_like(dtype=dtype)
    data = encode_volume(vol, chunk_bytes=MIN_CHUNK_BYTES)  # several frames
    assert data[:4] == MAGIC
    out, digest = decode_volume(data)
    assert digest == content_hash(vol)
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
    assert content_hash(Volume(a.array, (2.5, 0.7, 0.81), a.origin, a.direction)) != h
    # byte order must not change the identity of the scan
    assert content_hash(Volume(a.array.astype(">i2"), a.spacing, a.origin, a.direction)) == h


def test_streaming_feed_in_small_pieces_and_threads():
    vol = ct_like(shape=(10, 70, 60), seed=3)
    data = b"".join(iter_encode_volume(vol, chunk_bytes=MIN_CHUNK_BYTES, threads=2))
    assert data == encode_volume(vol, chunk_bytes=MIN_CHUNK_BYTES)  # threads keep the order
    dec = StreamDecoder(kinds=("volume",))
    for i in range(0, len(data), 777):
        dec.feed(data[i:i + 777])
    c = dec.finish()
    np.testing.assert_array_equal(c.arrays[0], vol.array)
    assert dec.received_bytes == len(data)


def test_bad_volume_headers_are_refused():
    with pytest.raises(WireError, match="unsupported voxel type"):
        encode_volume(Volume(np.zeros((2, 2, 2), np.complex64)))
    with pytest.raises(WireError, match="unsupported voxel type"):
        encode_volume(Volume(np.zeros((2, 2, 2), np.int64)))
    header, rest = split(encode_volume(ct_like(shape=(2, 3, 4))))
    geo = header["volume"]
    for key, bad in [("dtype", "<c8"), ("dtype", "|O"), ("shape", [2, 3]), ("shape", [2, 3, -4]),
                     ("shape", [2, 3, 4.0]), ("spacing", [0, 1, 1]), ("direction", [1, 0, 0, 0, 1, 0, 0, 0, 5])]:
        with pytest.raises(WireError):
            decode_volume(join(dict(header, volume=dict(geo, **{key: bad})), rest))
    for key, bad in [("raw_nbytes", 7), ("chunk_bytes", 3), ("hash", "x"), ("kind", "masks"), ("protocol", 1),
                     ("arrays", [{"dtype": "<i2", "shape": [2, 3, 5]}]), ("arrays", "x")]:
        with pytest.raises(WireError):
            decode_volume(join(dict(header, **{key: bad}), rest))


def test_corrupt_truncated_and_oversized():
    vol = ct_like()
    data = encode_volume(vol)
    with pytest.raises(WireError, match="magic"):
        decode_volume(b"XXXX" + data[4:])
    with pytest.raises(WireError, match="magic"):
        decode_volume(b"LLV1" + data[4:])  # protocol 1's volume stream
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
    dec = StreamDecoder(max_stream_bytes=100)
    with pytest.raises(PayloadTooLarge, match="limit"):
        dec.feed(data)
    with pytest.raises(WireError, match="nested|JSON"):  # absurd nesting is a WireError, not a RecursionError
        decode(MAGIC + struct.pack("<I", 200_000) + b"[" * 200_000)


def test_hash_mismatch_is_corrupt():
    a, b = ct_like(seed=1), ct_like(seed=2)
    with pytest.raises(WireError, match="hash mismatch"):
        decode_volume(b"".join(iter_encode_volume(a, volume_hash=content_hash(b))))


def test_two_level_hash_over_several_blocks():
    """Volumes above one hash block: threaded and serial hashing agree, frames need not align with blocks."""
    rng = np.random.default_rng(5)
    vol = Volume(rng.integers(-1000, 1000, size=(19, 300, 1000), dtype=np.int16))  # 11.4 MB: two blocks
    assert vol.array.nbytes > HASH_CHUNK_BYTES
    h1 = content_hash(vol, threads=1)
    assert content_hash(vol, threads=4) == h1
    out, digest = decode_volume(encode_volume(vol, chunk_bytes=3 * 2**20 + 17))
    assert digest == h1
    np.testing.assert_array_equal(out.array, vol.array)
    vol.array[18, 299, 999] += 1  # the very last voxel is covered by the hash
    assert content_hash(vol) != h1


# ----------------------------------------------------------------------------------------
# decompression bombs: declared sizes are checked before anything is inflated or allocated
def _frame_of(raw_size: int, declare: bool = True) -> bytes:
    return zstd.ZstdCompressor(level=19, write_content_size=declare).compress(b"\0" * raw_size)


def test_bomb_frames_are_refused_before_inflating():
    header = {"kind": "request", "protocol": 2, "request": {}, "arrays": [{"dtype": "bits", "shape": [8, 8, 8]}],
              "raw_nbytes": 64, "chunk_bytes": MIN_CHUNK_BYTES}
    frames = (_frame_of(256 * 2**20), _frame_of(64, declare=False))  # 256 MiB in ~8 KB; an undeclared size
    assert len(frames[0]) < 64 * 1024
    tracemalloc.start()
    try:
        for frame in frames:
            with pytest.raises(WireError, match="declares"):
                decode(join(header, struct.pack("<I", len(frame)) + frame + struct.pack("<I", 0)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"the decoder allocated {peak / 2**20:.0f} MiB for a refused bomb"
    # the declared arrays themselves are bounded before the output buffer exists
    big = dict(header, arrays=[{"dtype": "<f8", "shape": [2048, 2048, 2048]}], raw_nbytes=8 * 2048**3)
    with pytest.raises(PayloadTooLarge, match="declares"):
        decode(join(big, b""), max_raw_bytes=2**30)
    with pytest.raises(WireError, match="does not match"):
        decode(join(dict(header, raw_nbytes=10**12), b""))


# ----------------------------------------------------------------------------------------
# masks (replies): one container, several images, bit-packed crops, probabilities on request
def _lesion(lid, shape, seed):
    rng = np.random.default_rng(seed)
    z0, y0, x0 = (int(rng.integers(0, s - 5)) for s in shape)
    bbox = (z0, z0 + 5, y0, y0 + 3, x0, x0 + 4)
    return LesionMask(lid, bbox, rng.random((5, 3, 4)) > 0.5, center_voxel=(1.5, 2.0, 3.25))


def test_mask_results_round_trip():
    shape = (20, 30, 40)
    a = [_lesion(1, shape, 0), _lesion(300, shape, 1), LesionMask.not_found(7, (3.0, 4.0, 5.0))]
    b = [_lesion(1, shape, 2)]
    b[0].probability = np.random.default_rng(0).random(b[0].mask.shape).astype(np.float32)
    data = encode_results([("h0", shape, a), ("h1", shape, b)], {"elapsed_ms": 2.5})
    out = decode_results(data)
    assert out.header["elapsed_ms"] == 2.5 and out.images == ["h0", "h1"]
    assert list(out.results[0]) == [1, 300, 7]  # ids unchanged, in order
    for orig in a:
        got = out.results[0][orig.lesion_id]
        assert got.bbox == orig.bbox and got.status is orig.status and got.center_voxel == orig.center_voxel
        np.testing.assert_array_equal(got.full(shape), orig.full(shape))
    assert out.results[0][7].status is LesionStatus.NOT_FOUND and out.results[0][1].probability is None
    np.testing.assert_array_equal(out.results[1][1].probability, b[0].probability)
    # a click's answer is small: bit-packed and compressed
    assert len(encode_results([("h" * 64, shape, [_lesion(1, shape, 0)])])) < 600


def test_mask_results_reject_bad_input():
    shape = (20, 30, 40)
    data = encode_results([(None, shape, [_lesion(1, shape, 0)])])
    with pytest.raises(WireError):
        decode_results(data[:-3])
    with pytest.raises(WireError, match="expected a masks"):
        decode_results(encode_volume(ct_like(shape=(2, 3, 4))))
    header, rest = split(data)
    entry = header["results"][0]["lesions"][0]
    for bad in [dict(entry, bbox=[18, 23, 0, 3, 0, 4]), dict(entry, bbox=[0, 5, 0, 3, 0, 3]),
                dict(entry, mask=3), dict(entry, status="removed"), dict(entry, id="1"),
                dict(entry, probability=0), dict(entry, center_voxel=[1, 2])]:
        h = dict(header, results=[dict(header["results"][0], lesions=[bad])])
        with pytest.raises(WireError):
            decode_results(join(h, rest))
    with pytest.raises(WireError, match="does not match"):
        encode_results([(None, shape, [LesionMask(1, (0, 5, 0, 3, 0, 4), np.ones((5, 3, 3), bool))])])


# ----------------------------------------------------------------------------------------
# requests: the JSON request in the header, mask-prompt crops as arrays (core.prompts writes and reads them)
def test_request_container_carries_prompts_and_mask_crops():
    vol = ct_like(shape=(12, 16, 20))
    m = np.zeros(vol.shape, bool)
    m[3:7, 4:9, 10:12] = True
    m[5, 5, 5] = True
    prompts = {4: [Point((2.0, 3.5, 4.0)), Point((5.0, 5.0, 5.0))], 9: [Box((0, 3, 0, 4, 0, 5))], 300: [Mask(m)]}
    arrays: list = []
    body = {"prompts": prompts_to_json(prompts, arrays), "tta": True}
    c = decode(encode_request(body, arrays), kinds=("request",))
    req, got_arrays = request_of(c)
    assert req["tta"] is True
    parsed = parse_prompts(req["prompts"], vol, got_arrays)
    assert list(parsed) == [4, 9, 300] and parsed[4] == prompts[4] and parsed[9] == prompts[9]
    np.testing.assert_array_equal(parsed[300][0].mask, m)
    # only the crop travels (bit-packed): far below one bit per image voxel
    assert c.header["arrays"] == [{"dtype": "bits", "shape": [4, 5, 7]}]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(0, 400))
def test_fuzz_decoders_only_raise_wire_errors(junk, cut):
    """Random bytes, and valid containers with random splices, never fail with anything but WireError."""
    valid = [encode_volume(ct_like(shape=(2, 3, 4))),
             encode_results([(None, (20, 30, 40), [_lesion(1, (20, 30, 40), 0)])]),
             encode("request", [np.ones((2, 2, 2), bool)], {"request": {"prompts": {}}})]
    for v in valid:
        for data in (junk, MAGIC + junk, v[:cut] + junk, v[:8] + junk):
            try:
                decode(data, max_raw_bytes=10_000, max_voxels=10_000)
            except WireError:
                pass
            try:
                decode_results(data, max_raw_bytes=10_000)
            except WireError:
                pass
