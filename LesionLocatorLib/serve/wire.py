"""Wire format of the LesionLocator server: images up, changed mask regions down.

Two binary containers, both "magic + small JSON header + zstd data", so that a 150 MB CT
never travels as a NIfTI temp file and a click's answer is a few hundred bytes:

Volume stream (upload, client -> server)::

    b"LLV1" | u32 header_len | header JSON | (u32 frame_len | zstd frame)* | u32 0

The raw C-order little-endian array is cut into chunks of ``header["chunk_bytes"]`` bytes,
each compressed as its own zstd frame (with a content checksum).  Independent frames let
the client compress chunk k+1 while the server already decompresses chunk k, and let the
server stop reading as soon as the size cap is exceeded.  ``header["hash"]`` is the
content hash (see :func:`content_hash`); the server recomputes it while decoding, so a
corrupt or truncated payload is rejected, and a later upload of the same scan is skipped.

Mask bundle (reply, server -> client)::

    b"LLM1" | u32 header_len | header JSON | one zstd frame (np.packbits of every crop, concatenated)

``header["lesions"]`` lists, per lesion, its bounding box on the image grid and metadata;
each crop is packed separately (bit order "big", padded to whole bytes) so that the client
can paste each lesion's block without touching the rest of its label map.

All integers are little-endian.  Nothing here imports torch or a web framework.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import zstandard as zstd

from ..core.geometry import GeometryError, Volume
from ..core.results import LesionMask

PROTOCOL_VERSION = 1
VOLUME_MAGIC = b"LLV1"
MASKS_MAGIC = b"LLM1"
VOLUME_MEDIA_TYPE = "application/x-lesionlocator-volume"
MASKS_MEDIA_TYPE = "application/x-lesionlocator-masks"
BUNDLES_MEDIA_TYPE = "application/x-lesionlocator-bundles"

MAX_HEADER_BYTES = 64 * 1024
HASH_CHUNK_BYTES = 8 * 1024 * 1024  # part of the content-hash definition: never change within a protocol version
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 64 * 1024 * 1024
# A CT is rarely above 1024 x 1024 x 2000 voxels; anything beyond this is refused before allocating.
DEFAULT_MAX_VOXELS = 1024 * 1024 * 2048

# dtypes a scan may arrive in; CT is usually int16, Slicer hands out float32/float64 or (u)int8/16/32 too.
ALLOWED_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in ("<i1", "<u1", "<i2", "<u2", "<i4", "<u4", "<f4", "<f8")
}
_U32 = struct.Struct("<I")


class WireError(ValueError):
    """A payload on the wire is malformed, truncated, corrupt or over a limit."""


class PayloadTooLarge(WireError):
    """The payload exceeds a configured size limit (HTTP 413)."""


# --------------------------------------------------------------------------------------
# helpers
def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _pack_header(magic: bytes, header: Mapping[str, Any]) -> bytes:
    body = _canonical_json(header)
    if len(body) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    return magic + _U32.pack(len(body)) + body


def _parse_header_json(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    return header


def _as_le_array(array: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian copy-if-needed of ``array`` (the byte layout that is hashed and sent)."""
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return np.ascontiguousarray(array, dtype=dt)


def geometry_header(volume: Volume) -> dict:
    """Shape, dtype and geometry of ``volume`` as JSON-ready values (the part of the header that is hashed)."""
    arr = volume.array
    dt = np.dtype(arr.dtype).newbyteorder("<") if arr.dtype.byteorder == ">" else np.dtype(arr.dtype)
    if dt.str not in ALLOWED_DTYPES:
        raise WireError(
            f"unsupported voxel type {arr.dtype}; send one of {sorted(ALLOWED_DTYPES)} (int16 for CT)"
        )
    return {
        "shape": [int(s) for s in arr.shape],
        "dtype": dt.str,
        "spacing": [float(s) for s in volume.spacing],
        "origin": [float(o) for o in volume.origin],
        "direction": [float(d) for d in np.asarray(volume.direction, dtype=np.float64).ravel()],
    }


def _chunk_digests(raw: memoryview, threads: int) -> list[bytes]:
    starts = range(0, len(raw), HASH_CHUNK_BYTES)
    if threads <= 1 or len(starts) < 4:
        return [hashlib.sha256(raw[s:s + HASH_CHUNK_BYTES]).digest() for s in starts]
    from concurrent.futures import ThreadPoolExecutor

    # hashlib releases the GIL on large buffers: the chunks hash in parallel.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda s: hashlib.sha256(raw[s:s + HASH_CHUNK_BYTES]).digest(), starts))


def content_hash(volume: Volume, threads: int | None = None) -> str:
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
# volume stream
def iter_encode_volume(
    volume: Volume,
    level: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    volume_hash: str | None = None,
    threads: int = 1,
) -> Iterator[bytes]:
    """Yield the volume stream piece by piece (header first), for a streaming HTTP upload.

    ``threads`` > 1 compresses that many chunks at once (zstd releases the GIL); output order is kept.
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    header = geometry_header(volume)
    raw = memoryview(_as_le_array(volume.array)).cast("B")
    header.update(
        kind="volume",
        protocol=PROTOCOL_VERSION,
        raw_nbytes=len(raw),
        chunk_bytes=int(chunk_bytes),
        hash=volume_hash or content_hash(volume),
    )
    yield _pack_header(VOLUME_MAGIC, header)
    starts = range(0, len(raw), chunk_bytes)

    def compress(start: int) -> bytes:
        # one compressor per call: ZstdCompressor objects are not safe to share between threads.
        frame = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(
            raw[start:start + chunk_bytes]
        )
        return _U32.pack(len(frame)) + frame

    if threads <= 1:
        for s in starts:
            yield compress(s)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending: list = []
            it = iter(starts)
            # bounded look-ahead: at most 2*threads compressed chunks wait in memory.
            for s in it:
                pending.append(pool.submit(compress, s))
                if len(pending) >= 2 * threads:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()
    yield _U32.pack(0)


def encode_volume(volume: Volume, level: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> bytes:
    """The whole volume stream as one bytes object."""
    return b"".join(iter_encode_volume(volume, level=level, chunk_bytes=chunk_bytes))


@dataclass
class VolumeDecoder:
    """Incremental decoder of a volume stream: ``feed`` bytes as they arrive, then ``finish``.

    Every size is checked before memory is allocated: the header must declare a shape whose
    byte count matches ``raw_nbytes``, at most ``max_voxels`` voxels, and each frame must
    decompress to exactly the chunk it claims.  The content hash is recomputed on the fly.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_stream_bytes: int | None = None
    max_raw_bytes: int | None = None
    header: dict | None = None
    _buf: bytearray = field(default_factory=bytearray)
    _out: np.ndarray | None = None
    _pos: int = 0
    _received: int = 0
    _done: bool = False
    _hasher: Any = None
    _dctx: Any = None
    _hashed: int = 0

    def feed(self, data: bytes | memoryview) -> None:
        if self._done:
            if len(data):
                raise WireError("data after the end of the volume stream")
            return
        self._received += len(data)
        if self.max_stream_bytes is not None and self._received > self.max_stream_bytes:
            raise PayloadTooLarge(
                f"upload exceeds the limit of {self.max_stream_bytes / 2**20:.1f} MiB (compressed)"
            )
        self._buf += data
        self._drain()

    def _drain(self) -> None:
        if self.header is None:
            if len(self._buf) >= 4 and bytes(self._buf[:4]) != VOLUME_MAGIC:
                raise WireError("not a LesionLocator volume stream (bad magic bytes)")
            if len(self._buf) < 8:
                return
            (hlen,) = _U32.unpack_from(self._buf, 4)
            if hlen > MAX_HEADER_BYTES:
                raise WireError(f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
            if len(self._buf) < 8 + hlen:
                return
            self._start(_parse_header_json(bytes(self._buf[8:8 + hlen])))
            del self._buf[:8 + hlen]
        while not self._done and len(self._buf) >= 4:
            (flen,) = _U32.unpack_from(self._buf, 0)
            if flen == 0:
                del self._buf[:4]
                self._done = True
                if self._buf:
                    raise WireError("data after the end of the volume stream")
                return
            # a frame can be a little larger than its chunk when data is incompressible.
            if flen > self._chunk + self._chunk // 8 + 4096:
                raise WireError(f"frame of {flen} bytes is larger than any valid chunk")
            if len(self._buf) < 4 + flen:
                return
            self._frame(bytes(self._buf[4:4 + flen]))
            del self._buf[:4 + flen]

    def _start(self, h: dict) -> None:
        if h.get("kind") != "volume":
            raise WireError(f"expected a volume header, got kind={h.get('kind')!r}")
        shape = h.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise WireError(f"shape must be three positive integers (z, y, x), got {shape!r}")
        dtype = ALLOWED_DTYPES.get(h.get("dtype")) if isinstance(h.get("dtype"), str) else None
        if dtype is None:
            raise WireError(f"unsupported voxel type {h.get('dtype')!r}; allowed: {sorted(ALLOWED_DTYPES)}")
        n_vox = int(np.prod(shape, dtype=np.int64))
        if n_vox > self.max_voxels:
            raise PayloadTooLarge(f"volume of {shape} = {n_vox} voxels exceeds the limit of {self.max_voxels}")
        if self.max_raw_bytes is not None and n_vox * dtype.itemsize > self.max_raw_bytes:
            raise PayloadTooLarge(
                f"volume of {shape} x {dtype} = {n_vox * dtype.itemsize / 2**20:.1f} MiB exceeds the limit of "
                f"{self.max_raw_bytes / 2**20:.1f} MiB uncompressed"
            )
        if h.get("raw_nbytes") != n_vox * dtype.itemsize:
            raise WireError(f"raw_nbytes {h.get('raw_nbytes')!r} does not match shape {shape} x {dtype}")
        chunk = h.get("chunk_bytes")
        if not isinstance(chunk, int) or not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
            raise WireError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk!r}")
        if not isinstance(h.get("hash"), str) or len(h["hash"]) != 64:
            raise WireError("header needs the 64-hex-digit content hash")
        geo = {k: h.get(k) for k in ("shape", "dtype", "spacing", "origin", "direction")}
        try:
            # validates spacing / origin / direction (GeometryError) before the voxels arrive.
            Volume(np.zeros((1, 1, 1), np.uint8), tuple(geo["spacing"]), tuple(geo["origin"]),
                   np.asarray(geo["direction"], dtype=np.float64).reshape(3, 3))
        except (GeometryError, TypeError, ValueError) as exc:
            raise WireError(f"invalid geometry in the header: {exc}") from None
        self.header = h
        self._chunk = chunk
        self._dtype = dtype
        self._out = np.empty(n_vox * dtype.itemsize, dtype=np.uint8)
        self._hasher = hashlib.sha256(_canonical_json(geo))
        self._dctx = zstd.ZstdDecompressor()

    def _frame(self, frame: bytes) -> None:
        assert self._out is not None
        remaining = self._out.size - self._pos
        expect = min(self._chunk, remaining)
        if expect <= 0:
            raise WireError("more frames than the declared volume size")
        try:
            params = zstd.get_frame_parameters(frame)
        except zstd.ZstdError as exc:
            raise WireError(f"corrupt compressed frame at byte {self._pos}: {exc}") from None
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
        assert self._out is not None
        while self._pos - self._hashed >= HASH_CHUNK_BYTES or (final and self._hashed < self._pos):
            end = min(self._hashed + HASH_CHUNK_BYTES, self._pos)
            self._hasher.update(hashlib.sha256(memoryview(self._out[self._hashed:end])).digest())
            self._hashed = end

    @property
    def received_bytes(self) -> int:
        return self._received

    def finish(self) -> tuple[Volume, str]:
        """The decoded volume and its verified content hash; raises WireError if incomplete or corrupt."""
        if self.header is None:
            raise WireError("truncated volume stream: the header is incomplete")
        if not self._done:
            raise WireError(
                f"truncated volume stream: {self._pos} of {self._out.size if self._out is not None else '?'} "
                "bytes decoded and no end marker"
            )
        if self._pos != self._out.size:  # type: ignore[union-attr]
            size = self._out.size  # type: ignore[union-attr]
            raise WireError(f"truncated volume stream: {self._pos} of {size} bytes")
        self._hash_blocks(final=True)
        digest = self._hasher.hexdigest()
        if digest != self.header["hash"]:
            raise WireError("content hash mismatch: the payload is corrupt or the header hash is wrong")
        h = self.header
        arr = self._out.view(self._dtype).reshape(h["shape"])  # type: ignore[union-attr]
        vol = Volume(arr, tuple(h["spacing"]), tuple(h["origin"]), np.asarray(h["direction"]).reshape(3, 3))
        return vol, digest


def decode_volume(data: bytes, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[Volume, str]:
    """Decode a whole volume stream held in memory; returns (volume, content hash)."""
    dec = VolumeDecoder(max_voxels=max_voxels)
    dec.feed(data)
    return dec.finish()


# --------------------------------------------------------------------------------------
# mask bundles
def _bbox_ok(bbox: Any, shape: tuple[int, int, int] | None) -> tuple[int, ...]:
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 6
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in bbox)):
        raise WireError(f"bbox must be six integers (z0, z1, y0, y1, x0, x1), got {bbox!r}")
    b = tuple(int(v) for v in bbox)
    for ax in range(3):
        lo, hi = b[2 * ax], b[2 * ax + 1]
        if lo < 0 or hi < lo or (shape is not None and hi > shape[ax]):
            raise WireError(f"bbox {list(b)} lies outside the image of shape {shape}")
    return b


def encode_masks(
    lesions: Iterable[LesionMask],
    shape: tuple[int, int, int] | None = None,
    extra: Mapping[str, Any] | None = None,
    level: int = 3,
    per_lesion: Mapping[int, Mapping[str, Any]] | None = None,
) -> bytes:
    """Pack lesion crops (bbox + bit-packed mask) and their metadata into one mask bundle.

    ``per_lesion`` adds JSON metadata to a lesion's entry (e.g. the region a client must repaint).
    """
    entries = []
    blobs = []
    for les in lesions:
        m = np.asarray(les.mask, dtype=bool)
        b = _bbox_ok(les.bbox, shape)
        if m.shape != (b[1] - b[0], b[3] - b[2], b[5] - b[4]):
            raise WireError(f"lesion {les.lesion_id}: mask shape {m.shape} does not match bbox {list(b)}")
        packed = np.packbits(m.ravel(), bitorder="big").tobytes()
        entry = {
            "id": int(les.lesion_id),
            "bbox": list(b),
            "nbytes": len(packed),
            "voxels": int(np.count_nonzero(m)),
            "status": str(les.status),
            "center_voxel": None if les.center_voxel is None else [float(c) for c in les.center_voxel],
        }
        if per_lesion and les.lesion_id in per_lesion:
            entry.update(per_lesion[les.lesion_id])
        entries.append(entry)
        blobs.append(packed)
        if les.probability is not None:
            # probabilities only travel when asked for: exact float32, right after the lesion's mask bits
            prob = np.ascontiguousarray(les.probability, dtype="<f4")
            if prob.shape != m.shape:
                raise WireError(f"lesion {les.lesion_id}: probability shape {prob.shape} does not match its mask")
            entry["prob_nbytes"] = prob.nbytes
            blobs.append(prob.tobytes())
    raw = b"".join(blobs)
    header = {"kind": "masks", "protocol": PROTOCOL_VERSION, "shape": None if shape is None else list(shape),
              "lesions": entries, "raw_nbytes": len(raw)}
    if extra:
        header.update(extra)
    payload = zstd.ZstdCompressor(level=level, write_checksum=True).compress(raw)
    return _pack_header(MASKS_MAGIC, header) + payload


@dataclass
class MaskBundle:
    header: dict
    lesions: dict[int, LesionMask]
    entries: dict[int, dict]


def decode_masks(data: bytes, max_raw_bytes: int = 1 << 31) -> MaskBundle:
    """Inverse of :func:`encode_masks`; validates every size before unpacking."""
    if len(data) < 8 or data[:4] != MASKS_MAGIC:
        raise WireError("not a LesionLocator mask bundle (bad magic bytes or too short)")
    (hlen,) = _U32.unpack_from(data, 4)
    if hlen > MAX_HEADER_BYTES or len(data) < 8 + hlen:
        raise WireError("truncated or oversized mask bundle header")
    header = _parse_header_json(data[8:8 + hlen])
    if header.get("kind") != "masks" or not isinstance(header.get("lesions"), list):
        raise WireError("mask bundle header lacks the lesion list")
    raw_n = header.get("raw_nbytes")
    if not isinstance(raw_n, int) or not 0 <= raw_n <= max_raw_bytes:
        raise WireError(f"invalid raw_nbytes {raw_n!r} in the mask bundle")
    try:
        raw = zstd.ZstdDecompressor().decompress(data[8 + hlen:], max_output_size=max(raw_n, 1)) if raw_n else b""
    except zstd.ZstdError as exc:
        raise WireError(f"corrupt mask bundle payload: {exc}") from None
    if len(raw) != raw_n:
        raise WireError(f"mask bundle payload is {len(raw)} bytes, header says {raw_n}")
    shape = header.get("shape")
    shape_t = tuple(shape) if isinstance(shape, list) and len(shape) == 3 else None
    lesions: dict[int, LesionMask] = {}
    entries: dict[int, dict] = {}
    pos = 0
    for e in header["lesions"]:
        if not isinstance(e, dict) or not isinstance(e.get("id"), int):
            raise WireError(f"malformed lesion entry {e!r}")
        b = _bbox_ok(e.get("bbox"), shape_t)  # type: ignore[arg-type]
        crop = (b[1] - b[0], b[3] - b[2], b[5] - b[4])
        n = int(np.prod(crop, dtype=np.int64))
        nbytes = (n + 7) // 8
        if e.get("nbytes") != nbytes or pos + nbytes > len(raw):
            raise WireError(f"lesion {e['id']}: packed size does not match its bbox {list(b)}")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8, count=nbytes, offset=pos), count=n, bitorder="big")
        pos += nbytes
        prob = None
        if "prob_nbytes" in e:
            if e["prob_nbytes"] != 4 * n or pos + 4 * n > len(raw):
                raise WireError(f"lesion {e['id']}: probability size does not match its bbox {list(b)}")
            prob = np.frombuffer(raw, "<f4", count=n, offset=pos).astype(np.float32).reshape(crop)
            pos += 4 * n
        cv = e.get("center_voxel")
        lesions[e["id"]] = LesionMask(
            lesion_id=e["id"], bbox=b, mask=bits.view(np.bool_).reshape(crop),  # type: ignore[arg-type]
            probability=prob,
            status=str(e.get("status", "found")),
            center_voxel=None if cv is None else tuple(float(c) for c in cv),  # type: ignore[arg-type]
        )
        entries[e["id"]] = e
    if pos != len(raw):
        raise WireError("mask bundle payload has trailing bytes")
    return MaskBundle(header=header, lesions=lesions, entries=entries)


# --------------------------------------------------------------------------------------
# small masks inside JSON requests (mask prompts): bbox + base64(zstd(packbits))
def encode_mask_prompt(mask: np.ndarray | LesionMask) -> dict:
    """A mask prompt as a JSON object ``{"bbox": [...], "data": base64}`` holding only its tight crop."""
    import base64

    from ..core.results import tight_bbox

    if isinstance(mask, LesionMask):
        full_bbox, crop = mask.bbox, np.asarray(mask.mask, bool)
    else:
        arr = np.asarray(mask)
        if arr.ndim != 3:
            raise WireError(f"a mask prompt must be 3D, got shape {arr.shape}")
        tb = tight_bbox(arr != 0)
        if tb is None:
            raise WireError("a mask prompt is empty")
        full_bbox = tb
        crop = arr[tb[0]:tb[1], tb[2]:tb[3], tb[4]:tb[5]] != 0
    packed = np.packbits(crop.ravel(), bitorder="big").tobytes()
    return {"bbox": [int(v) for v in full_bbox],
            "data": base64.b64encode(zstd.ZstdCompressor(level=3).compress(packed)).decode("ascii")}


def decode_mask_prompt(obj: Mapping[str, Any], shape: tuple[int, int, int]) -> np.ndarray:
    """Full-size uint8 mask on an image of ``shape`` from :func:`encode_mask_prompt` output."""
    import base64
    import binascii

    b = _bbox_ok(obj.get("bbox"), shape)
    crop = (b[1] - b[0], b[3] - b[2], b[5] - b[4])
    n = int(np.prod(crop, dtype=np.int64))
    nbytes = (n + 7) // 8
    try:
        comp = base64.b64decode(str(obj.get("data", "")), validate=True)
        packed = zstd.ZstdDecompressor().decompress(comp, max_output_size=max(nbytes, 1))
    except (binascii.Error, ValueError, zstd.ZstdError) as exc:
        raise WireError(f"mask prompt data is not valid base64 zstd: {exc}") from None
    if len(packed) != nbytes:
        raise WireError(f"mask prompt holds {len(packed)} bytes, its bbox {list(b)} needs {nbytes}")
    out = np.zeros(shape, np.uint8)
    out[b[0]:b[1], b[2]:b[3], b[4]:b[5]] = np.unpackbits(
        np.frombuffer(packed, np.uint8), count=n, bitorder="big").reshape(crop)
    return out


# --------------------------------------------------------------------------------------
# several mask bundles in one reply (tracking: one bundle per follow-up image)
_U64 = struct.Struct("<Q")


def pack_bundles(parts: list[bytes]) -> bytes:
    """u32 count, then (u64 length, mask bundle) per part."""
    return _U32.pack(len(parts)) + b"".join(_U64.pack(len(p)) + p for p in parts)


def unpack_bundles(data: bytes) -> list[bytes]:
    """Inverse of :func:`pack_bundles`; every length is checked against the data."""
    if len(data) < 4:
        raise WireError("truncated bundle list")
    (n,) = _U32.unpack_from(data, 0)
    pos, out = 4, []
    for _ in range(n):
        if pos + 8 > len(data):
            raise WireError("truncated bundle list")
        (ln,) = _U64.unpack_from(data, pos)
        pos += 8
        if pos + ln > len(data):
            raise WireError("truncated bundle list")
        out.append(data[pos:pos + ln])
        pos += ln
    if pos != len(data):
        raise WireError("trailing bytes after the bundle list")
    return out
