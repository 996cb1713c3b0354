"""The one wire container of the LesionLocator server: volumes up, mask prompts up, masks down.

Every binary body (an uploaded scan, a request carrying mask prompts, a reply of lesion masks, a
tracking reply) is the same container::

    b"LLW2" | u32 header_len | header JSON | (u32 frame_len | zstd frame)* | u32 0

``header["arrays"]`` lists the arrays the body carries, in order: ``{"dtype": "<i2", "shape": [...]}``
(little-endian numpy dtype) or ``{"dtype": "bits", "shape": [...]}`` (a boolean array, ``np.packbits``
bit order "big", padded to whole bytes).  Their raw bytes, concatenated, form one stream of
``header["raw_nbytes"]`` bytes cut into chunks of ``header["chunk_bytes"]``, each compressed as its own zstd
frame that declares its content size.  Independent frames let the client compress chunk k+1 while the
server already decompresses chunk k (the streaming decoder), and every size is checked against the header
and the caller's limits *before* memory is allocated, so a small body can never make the decoder allocate
more than it declared (no decompression bombs).

``header["kind"]`` says what the arrays mean:
- "volume": one array, the scan; ``header["volume"]`` holds shape, dtype and geometry and ``header["hash"]``
  the content hash (:func:`content_hash`), recomputed block by block while decoding (a corrupt payload is
  refused; a later upload of the same scan is skipped).
- "masks": lesion masks as bounding box + bit-packed crop (+ float32 probabilities on request);
  ``header["results"]`` is a list of ``{"image": hash, "shape": [...], "lesions": [...]}`` (one entry per
  image: one for a segment reply, baseline + follow-ups for a tracking reply).
- "request": ``header["request"]`` is the JSON request; mask prompts reference their crops by array index
  (``core.prompts.prompts_to_json`` writes them, ``core.prompts.parse_prompts`` reads them).

All integers are little-endian.  Nothing here imports torch or a web framework.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import zstandard as zstd

from ..core.geometry import GeometryError, Volume
from ..core.results import LesionMask, LesionStatus

PROTOCOL_VERSION = 2
MAGIC = b"LLW2"
MEDIA_TYPE = "application/x-lesionlocator"

MAX_HEADER_BYTES = 1 << 20  # a request header holds its prompts (JSON); 1 MiB is thousands of lesions
MAX_ARRAYS = 4096
HASH_CHUNK_BYTES = 8 * 1024 * 1024  # part of the content-hash definition: never change within a protocol version
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024
# A CT is rarely above 1024 x 1024 x 2000 voxels; anything beyond this is refused before allocating.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 2048
DEFAULT_MAX_RAW_BYTES = 1 << 31

# dtypes a scan may arrive in; CT is usually int16, Slicer hands out float32/float64 or (u)int8/16/32 too.
ALLOWED_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in ("<i1", "<u1", "<i2", "<u2", "<i4", "<u4", "<f4", "<f8")
}
BITS = "bits"
_U32 = struct.Struct("<I")


class WireError(ValueError):
    """A payload on the wire is malformed, truncated, corrupt or over a limit."""


class PayloadTooLarge(WireError):
    """The payload exceeds a configured size limit (HTTP 413)."""


# --------------------------------------------------------------------------------------
# helpers
def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def parse_json(raw: bytes, what: str = "header") -> Any:
    """JSON from untrusted bytes: one WireError for every way it can be wrong (incl. absurd nesting)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"{what} is not valid UTF-8 JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


def _as_le_array(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian copy-if-needed of ``array`` (the byte layout that is hashed and sent)."""
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return np.ascontiguousarray(array, dtype=dt)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _array_nbytes(spec: Any) -> int:
    """Raw byte count of one array entry of the header (validated)."""
    if not isinstance(spec, Mapping) or set(spec) != {"dtype", "shape"}:
        raise WireError(f"array entry must be {{'dtype', 'shape'}}, got {spec!r}"[:300])
    shape = spec["shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
            or not all(_is_int(s) and 0 <= s <= 2**31 for s in shape)):
        raise WireError(f"array shape must be 1 to 4 non-negative integers, got {shape!r}"[:300])
    n = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if spec["dtype"] == BITS:
        return (n + 7) // 8
    dt = ALLOWED_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dt is None:
        raise WireError(f"unsupported array type {spec['dtype']!r}; allowed: {sorted(ALLOWED_DTYPES)} and 'bits'")
    return n * dt.itemsize


def _array_spec_and_bytes(array: np.ndarray) -> Tuple[dict, memoryview]:
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        packed = np.packbits(np.ascontiguousarray(arr).ravel(), bitorder="big")
        return {"dtype": BITS, "shape": [int(s) for s in arr.shape]}, memoryview(packed).cast("B")
    le = _as_le_array(arr)
    if le.dtype.str not in ALLOWED_DTYPES:
        raise WireError(f"unsupported array type {arr.dtype}; send one of {sorted(ALLOWED_DTYPES)} or bool")
    return {"dtype": le.dtype.str, "shape": [int(s) for s in le.shape]}, memoryview(le).cast("B")


# --------------------------------------------------------------------------------------
# content hash of a scan
def geometry_header(volume: Volume) -> dict:
    """Shape, dtype and geometry of ``volume`` as JSON-ready values (the part of the header that is hashed)."""
    arr = volume.array
    dt = np.dtype(arr.dtype).newbyteorder("<") if arr.dtype.byteorder == ">" else np.dtype(arr.dtype)
    if dt.str not in ALLOWED_DTYPES:
        raise WireError(f"unsupported voxel type {arr.dtype}; send one of {sorted(ALLOWED_DTYPES)} (int16 for CT)")
    return {
        "shape": [int(s) for s in arr.shape],
        "dtype": dt.str,
        "spacing": [float(s) for s in volume.spacing],
        "origin": [float(o) for o in volume.origin],
        "direction": [float(d) for d in np.asarray(volume.direction, dtype=np.float64).ravel()],
    }


def _chunk_digests(raw: memoryview, threads: int) -> List[bytes]:
    starts = range(0, len(raw), HASH_CHUNK_BYTES)
    if threads <= 1 or len(starts) < 4:
        return [hashlib.sha256(raw[s:s + HASH_CHUNK_BYTES]).digest() for s in starts]
    from concurrent.futures import ThreadPoolExecutor

    # hashlib releases the GIL on large buffers: the chunks hash in parallel.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda s: hashlib.sha256(raw[s:s + HASH_CHUNK_BYTES]).digest(), starts))


def content_hash(volume: Volume, threads: Optional[int] = None) -> str:
    """Identity of a scan: equal hash <=> same voxels on the same grid.

    SHA-256 over the geometry header and the SHA-256 digests of the raw little-endian voxels in
    blocks of HASH_CHUNK_BYTES (a two-level hash, so that both sides can hash blocks in parallel
    and the server can hash each block as soon as it is decoded).
    """
    geo = geometry_header(volume)
    raw = memoryview(_as_le_array(volume.array)).cast("B")
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    h = hashlib.sha256(_canonical_json(geo))
    h.update(b"".join(_chunk_digests(raw, threads)))
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# encoding
def iter_encode(kind: str, arrays: Sequence[np.ndarray] = (), extra: Optional[Mapping[str, Any]] = None,
                level: int = 3, chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int = 1) -> Iterator[bytes]:
    """Yield a container piece by piece (header first), for a streaming HTTP body.

    ``threads`` > 1 compresses that many chunks at once (zstd releases the GIL); output order is kept.
    Bool arrays travel bit-packed; others as little-endian bytes.
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    specs, views = [], []
    for a in arrays:
        spec, view = _array_spec_and_bytes(a)
        specs.append(spec)
        views.append(view)
    # one segment (a scan) is sliced without copying; several small crops are joined once.
    raw = views[0] if len(views) == 1 else memoryview(b"".join(views))
    header = dict(extra or {})
    header.update(kind=kind, protocol=PROTOCOL_VERSION, arrays=specs, raw_nbytes=len(raw),
                  chunk_bytes=int(chunk_bytes))
    body = _canonical_json(header)
    if len(body) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    yield MAGIC + _U32.pack(len(body)) + body
    starts = range(0, len(raw), chunk_bytes)

    def compress(start: int) -> bytes:
        # one compressor per call: ZstdCompressor objects are not safe to share between threads.
        frame = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(
            raw[start:start + chunk_bytes])
        return _U32.pack(len(frame)) + frame

    if threads <= 1 or len(starts) < 2:
        for s in starts:
            yield compress(s)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending: list = []
            # bounded look-ahead: at most 2*threads compressed chunks wait in memory.
            for s in starts:
                pending.append(pool.submit(compress, s))
                if len(pending) >= 2 * threads:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()
    yield _U32.pack(0)


def encode(kind: str, arrays: Sequence[np.ndarray] = (), extra: Optional[Mapping[str, Any]] = None,
           level: int = 3, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> bytes:
    """The whole container as one bytes object."""
    return b"".join(iter_encode(kind, arrays, extra, level=level, chunk_bytes=chunk_bytes))


def iter_encode_volume(volume: Volume, level: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       volume_hash: Optional[str] = None, threads: int = 1) -> Iterator[bytes]:
    """A scan as a streaming "volume" container (``volume_hash``: its :func:`content_hash`, if known)."""
    geo = geometry_header(volume)
    return iter_encode("volume", [_as_le_array(volume.array)],
                       {"volume": geo, "hash": volume_hash or content_hash(volume)},
                       level=level, chunk_bytes=chunk_bytes, threads=threads)


def encode_volume(volume: Volume, level: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> bytes:
    return b"".join(iter_encode_volume(volume, level=level, chunk_bytes=chunk_bytes))


# --------------------------------------------------------------------------------------
# the streaming decoder
@dataclass
class Container:
    header: dict
    arrays: List[np.ndarray]


@dataclass
class StreamDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, then ``finish``.

    Every size is checked before memory is allocated: the arrays the header declares must add up to
    ``raw_nbytes`` and stay under ``max_raw_bytes`` (and a volume under ``max_voxels``); each frame must
    declare exactly the chunk it holds, checked before it is decompressed.  A volume's content hash is
    recomputed block by block as its chunks arrive.
    """

    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES
    max_stream_bytes: Optional[int] = None
    max_voxels: int = DEFAULT_MAX_VOXELS
    kinds: Optional[Tuple[str, ...]] = None  # accepted header kinds (None: any)
    header: Optional[dict] = None
    _buf: bytearray = field(default_factory=bytearray)
    _out: Optional[np.ndarray] = None
    _pos: int = 0
    _received: int = 0
    _done: bool = False
    _hasher: Any = None
    _dctx: Any = None
    _hashed: int = 0
    _chunk: int = 0

    @property
    def received_bytes(self) -> int:
        return self._received

    def feed(self, data: bytes) -> None:
        if self._done:
            if len(data):
                raise WireError("data after the end of the stream")
            return
        self._received += len(data)
        if self.max_stream_bytes is not None and self._received > self.max_stream_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {self.max_stream_bytes / 2**20:.1f} MiB (compressed)")
        self._buf += data
        self._drain()

    def _drain(self) -> None:
        if self.header is None:
            if len(self._buf) >= 4 and bytes(self._buf[:4]) != MAGIC:
                raise WireError(f"not a LesionLocator container (bad magic bytes; protocol {PROTOCOL_VERSION} "
                                f"starts with {MAGIC!r})")
            if len(self._buf) < 8:
                return
            (hlen,) = _U32.unpack_from(self._buf, 4)
            if hlen > MAX_HEADER_BYTES:
                raise WireError(f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
            if len(self._buf) < 8 + hlen:
                return
            header = parse_json(bytes(self._buf[8:8 + hlen]))
            del self._buf[:8 + hlen]
            self._start(header)
        while not self._done and len(self._buf) >= 4:
            (flen,) = _U32.unpack_from(self._buf, 0)
            if flen == 0:
                del self._buf[:4]
                self._done = True
                if self._buf:
                    raise WireError("data after the end of the stream")
                return
            # a frame can be a little larger than its chunk when data is incompressible.
            if flen > self._chunk + self._chunk // 8 + 4096:
                raise WireError(f"frame of {flen} bytes is larger than any valid chunk")
            if len(self._buf) < 4 + flen:
                return
            self._frame(bytes(self._buf[4:4 + flen]))
            del self._buf[:4 + flen]

    def _start(self, h: Any) -> None:
        if not isinstance(h, dict):
            raise WireError("header must be a JSON object")
        kind = h.get("kind")
        if self.kinds is not None and kind not in self.kinds:
            raise WireError(f"expected a {' or '.join(self.kinds)} container, got kind={kind!r}"[:300])
        if h.get("protocol") != PROTOCOL_VERSION:
            raise WireError(f"container of protocol {h.get('protocol')!r}, expected {PROTOCOL_VERSION}"[:300])
        arrays = h.get("arrays")
        if not isinstance(arrays, list) or len(arrays) > MAX_ARRAYS:
            raise WireError(f"header needs a list of at most {MAX_ARRAYS} arrays")
        total = sum(_array_nbytes(a) for a in arrays)
        if h.get("raw_nbytes") != total:
            raise WireError(f"raw_nbytes {h.get('raw_nbytes')!r} does not match the declared arrays ({total} bytes)"
                            [:300])
        if total > self.max_raw_bytes:
            raise PayloadTooLarge(f"body declares {total / 2**20:.1f} MiB of data; the limit is "
                                  f"{self.max_raw_bytes / 2**20:.1f} MiB")
        chunk = h.get("chunk_bytes")
        if not _is_int(chunk) or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise WireError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk!r}"[:300])
        if kind == "volume":
            self._check_volume(h)
            self._hasher = hashlib.sha256(_canonical_json(h["volume"]))
        self.header = h
        self._chunk = int(chunk)
        self._out = np.empty(total, dtype=np.uint8)  # the only allocation, of the checked size
        self._dctx = zstd.ZstdDecompressor()

    def _check_volume(self, h: dict) -> None:
        geo = h.get("volume")
        if not isinstance(geo, dict) or set(geo) != {"shape", "dtype", "spacing", "origin", "direction"}:
            raise WireError("a volume header needs volume = {shape, dtype, spacing, origin, direction}")
        shape, arrays = geo["shape"], h["arrays"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(_is_int(s) and s > 0 for s in shape)):
            raise WireError(f"shape must be three positive integers (z, y, x), got {shape!r}"[:300])
        if geo["dtype"] not in ALLOWED_DTYPES:
            raise WireError(f"unsupported voxel type {geo['dtype']!r}; allowed: {sorted(ALLOWED_DTYPES)}"[:300])
        if len(arrays) != 1 or arrays[0] != {"dtype": geo["dtype"], "shape": shape}:
            raise WireError("a volume container holds exactly one array of the volume's shape and dtype")
        n_vox = int(np.prod(shape, dtype=np.int64))
        if n_vox > self.max_voxels:
            raise PayloadTooLarge(f"volume of {shape} = {n_vox} voxels exceeds the limit of {self.max_voxels}")
        if not isinstance(h.get("hash"), str) or len(h["hash"]) != 64:
            raise WireError("a volume header needs the 64-hex-digit content hash")
        try:
            # validates spacing / origin / direction (GeometryError) before the voxels arrive.
            Volume(np.zeros((1, 1, 1), np.uint8), tuple(geo["spacing"]), tuple(geo["origin"]),
                   np.asarray(geo["direction"], dtype=np.float64).reshape(3, 3))
        except (GeometryError, TypeError, ValueError) as exc:
            raise WireError(f"invalid geometry in the header: {exc}"[:300]) from None

    def _frame(self, frame: bytes) -> None:
        assert self._out is not None
        expect = min(self._chunk, self._out.size - self._pos)
        if expect <= 0:
            raise WireError("more frames than the declared data")
        try:
            params = zstd.get_frame_parameters(frame)
        except zstd.ZstdError as exc:
            raise WireError(f"corrupt compressed frame at byte {self._pos}: {exc}") from None
        # the bomb guard: a frame must declare its size, and exactly the expected one, before it is inflated
        if params.content_size != expect:
            raise WireError(f"frame at byte {self._pos} declares {params.content_size} bytes, expected {expect}")
        try:
            data = self._dctx.decompress(frame, max_output_size=expect)
        except zstd.ZstdError as exc:
            raise WireError(f"corrupt compressed frame at byte {self._pos}: {exc}") from None
        if len(data) != expect:
            raise WireError(f"frame at byte {self._pos} decompressed to {len(data)} bytes, expected {expect}")
        self._out[self._pos:self._pos + expect] = np.frombuffer(data, dtype=np.uint8)
        self._pos += expect
        self._hash_blocks(final=False)

    def _hash_blocks(self, final: bool) -> None:
        """Digest every complete HASH_CHUNK_BYTES block decoded so far (and the tail when ``final``)."""
        if self._hasher is None:
            return
        assert self._out is not None
        while self._pos - self._hashed >= HASH_CHUNK_BYTES or (final and self._hashed < self._pos):
            end = min(self._hashed + HASH_CHUNK_BYTES, self._pos)
            self._hasher.update(hashlib.sha256(memoryview(self._out[self._hashed:end])).digest())
            self._hashed = end

    def finish(self) -> Container:
        """The decoded arrays (a volume's content hash verified); raises WireError if incomplete or corrupt."""
        if self.header is None or self._out is None:
            raise WireError("truncated body: the header is incomplete")
        if not self._done or self._pos != self._out.size:
            raise WireError(f"truncated body: {self._pos} of {self._out.size} bytes decoded"
                            + ("" if self._done else " and no end marker"))
        if self._hasher is not None:
            self._hash_blocks(final=True)
            if self._hasher.hexdigest() != self.header["hash"]:
                raise WireError("content hash mismatch: the payload is corrupt or the header hash is wrong")
        arrays, pos = [], 0
        for spec in self.header["arrays"]:
            n = _array_nbytes(spec)
            shape = tuple(spec["shape"])
            buf = self._out[pos:pos + n]
            if spec["dtype"] == BITS:
                count = int(np.prod(shape, dtype=np.int64))
                arrays.append(np.unpackbits(buf, count=count, bitorder="big").view(np.bool_).reshape(shape))
            else:
                arrays.append(buf.view(ALLOWED_DTYPES[spec["dtype"]]).reshape(shape))  # a view: no copy
            pos += n
        return Container(self.header, arrays)


def decode(data: bytes, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES, kinds: Optional[Tuple[str, ...]] = None,
           max_voxels: int = DEFAULT_MAX_VOXELS) -> Container:
    """Decode a whole container held in memory."""
    dec = StreamDecoder(max_raw_bytes=max_raw_bytes, kinds=kinds, max_voxels=max_voxels)
    dec.feed(data)
    return dec.finish()


def volume_of(c: Container) -> Tuple[Volume, str]:
    """(volume, content hash) of a decoded "volume" container."""
    if c.header.get("kind") != "volume":
        raise WireError(f"expected a volume container, got kind={c.header.get('kind')!r}")
    g = c.header["volume"]
    vol = Volume(c.arrays[0], tuple(g["spacing"]), tuple(g["origin"]), np.asarray(g["direction"]).reshape(3, 3))
    return vol, c.header["hash"]


def decode_volume(data: bytes, max_voxels: int = DEFAULT_MAX_VOXELS) -> Tuple[Volume, str]:
    """Decode a whole volume container held in memory; returns (volume, content hash)."""
    return volume_of(decode(data, kinds=("volume",), max_voxels=max_voxels))


# --------------------------------------------------------------------------------------
# lesion masks (replies): bbox + bit-packed crop per lesion, several images per reply
def _bbox_ok(bbox: Any, shape: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 6 or not all(_is_int(v) for v in bbox):
        raise WireError(f"bbox must be six integers (z0, z1, y0, y1, x0, x1), got {bbox!r}"[:300])
    b = tuple(int(v) for v in bbox)
    for ax in range(3):
        lo, hi = b[2 * ax], b[2 * ax + 1]
        if lo < 0 or hi < lo or (shape is not None and hi > shape[ax]):
            raise WireError(f"bbox {list(b)} lies outside the image of shape {shape}")
    return b


def lesion_entries(lesions: Iterable[LesionMask], arrays: List[np.ndarray]) -> List[dict]:
    """JSON entries of lesion masks; their crops (and probabilities) are appended to ``arrays``."""
    out = []
    for les in lesions:
        m = np.asarray(les.mask, dtype=bool)
        b = _bbox_ok(les.bbox, None)
        if m.shape != (b[1] - b[0], b[3] - b[2], b[5] - b[4]):
            raise WireError(f"lesion {les.lesion_id}: mask shape {m.shape} does not match bbox {list(b)}")
        arrays.append(m)
        entry = {"id": int(les.lesion_id), "bbox": list(b), "status": LesionStatus(les.status).value,
                 "center_voxel": None if les.center_voxel is None else [float(c) for c in les.center_voxel],
                 "mask": len(arrays) - 1}
        if les.probability is not None:  # only when asked for: exact float32 on the same crop
            prob = np.asarray(les.probability, dtype=np.float32)
            if prob.shape != m.shape:
                raise WireError(f"lesion {les.lesion_id}: probability shape {prob.shape} does not match its mask")
            arrays.append(prob)
            entry["probability"] = len(arrays) - 1
        out.append(entry)
    return out


def lesions_from_entries(entries: Any, arrays: Sequence[np.ndarray],
                         shape: Optional[Sequence[int]] = None) -> Dict[int, LesionMask]:
    """Inverse of :func:`lesion_entries`; every entry is checked against its arrays and the image shape."""
    if not isinstance(entries, list):
        raise WireError("lesions must be a list")
    out: Dict[int, LesionMask] = {}
    for e in entries:
        if not isinstance(e, dict) or not _is_int(e.get("id")) or not _is_int(e.get("mask")):
            raise WireError(f"malformed lesion entry {e!r}"[:300])
        b = _bbox_ok(e.get("bbox"), shape)
        crop = (b[1] - b[0], b[3] - b[2], b[5] - b[4])
        k = e["mask"]
        if not 0 <= k < len(arrays) or arrays[k].dtype != np.bool_ or arrays[k].shape != crop:
            raise WireError(f"lesion {e['id']}: its mask array does not match its bbox {list(b)}")
        prob = None
        if e.get("probability") is not None:
            p = e["probability"]
            if (not _is_int(p) or not 0 <= p < len(arrays) or arrays[p].dtype != np.float32
                    or arrays[p].shape != crop):
                raise WireError(f"lesion {e['id']}: its probability array does not match its bbox {list(b)}")
            prob = np.array(arrays[p])
        try:
            status = LesionStatus(e.get("status", "found"))
        except ValueError:
            raise WireError(f"lesion {e['id']}: unknown status {e.get('status')!r}"[:300]) from None
        cv = e.get("center_voxel")
        if cv is not None and (not isinstance(cv, list) or len(cv) != 3
                               or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cv)):
            raise WireError(f"lesion {e['id']}: center_voxel must be three numbers")
        out[int(e["id"])] = LesionMask(int(e["id"]), b, arrays[k], prob, status,  # type: ignore[arg-type]
                                       None if cv is None else tuple(float(c) for c in cv))  # type: ignore[arg-type]
    return out


def encode_results(results: Sequence[Tuple[Optional[str], Sequence[int], Iterable[LesionMask]]],
                   extra: Optional[Mapping[str, Any]] = None, level: int = 3) -> bytes:
    """A "masks" container: per image (content hash, shape, lesions)."""
    arrays: List[np.ndarray] = []
    items = [{"image": h, "shape": [int(s) for s in shape], "lesions": lesion_entries(lesions, arrays)}
             for h, shape, lesions in results]
    return encode("masks", arrays, dict(extra or {}, results=items), level=level)


@dataclass
class MaskReply:
    header: dict
    results: List[Dict[int, LesionMask]]
    images: List[Optional[str]]


def decode_results(data: bytes, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> MaskReply:
    """Inverse of :func:`encode_results` (sizes checked before allocating)."""
    c = decode(data, max_raw_bytes=max_raw_bytes, kinds=("masks",))
    items = c.header.get("results")
    if not isinstance(items, list):
        raise WireError("a masks container needs a results list")
    results, images = [], []
    for it in items:
        if not isinstance(it, dict):
            raise WireError("malformed result entry")
        shape = it.get("shape")
        if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
            raise WireError(f"result shape must be three positive integers, got {shape!r}"[:300])
        results.append(lesions_from_entries(it.get("lesions"), c.arrays, shape))
        images.append(it.get("image") if isinstance(it.get("image"), str) else None)
    return MaskReply(c.header, results, images)


# --------------------------------------------------------------------------------------
# requests: the JSON request in the header, mask-prompt crops as arrays
def encode_request(body: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    return encode("request", arrays, {"request": dict(body)}, level=3)


def request_of(c: Container) -> Tuple[Any, List[np.ndarray]]:
    if c.header.get("kind") != "request" or "request" not in c.header:
        raise WireError("expected a request container with the JSON request in its header")
    return c.header["request"], c.arrays
