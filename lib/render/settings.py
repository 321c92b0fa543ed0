"""Speed and memory knobs of the renderers, as one settings object.

No field of :class:`RenderSettings` changes an image, a gradient or a face index: each field
does not change the output, only speed/memory (the tests render with the alternatives and
check the bits are equal).  Every renderer takes ``settings=`` (default :data:`DEFAULT`), so
tests and benchmarks compare the paths without touching module state.
"""
from __future__ import annotations

from dataclasses import dataclass

from .screen import TILE

__all__ = ["RenderSettings", "DEFAULT"]


@dataclass(frozen=True)
class RenderSettings:
    """How the renderers schedule their work; none of it changes the output, only speed/memory.

    Args:
        cull_tiles: soft silhouette: drop the face tiles wholly beyond the blur radius
            before evaluating them (False: evaluate every tile of the blur-expanded face
            boxes).  Default True.
        reuse_buffers: soft silhouette on the CPU: keep per-thread scratch buffers from call
            to call (False: fresh tensors per chunk).  Default True.
        chunk_tiles: soft silhouette: at most this many tiles evaluated at once (x TILE *
            TILE face-pixel slots; an even number of equal chunks); bounds the scratch
            memory.  Default 2^14.
        save_slots: soft silhouette with all faces (no ``faces_per_pixel``): up to this many
            slots the forward pass keeps its per-slot terms for the backward pass; above it
            the backward pass recomputes them (bounded memory).  With ``faces_per_pixel``
            only the kept slots' terms are kept.  Default 2^24.
        radix_nearest: soft silhouette with ``faces_per_pixel``: choose each pixel's nearest
            faces by per-pixel depth buckets and an integer sort of the one bucket that holds
            its K-th nearest (False: two stable float sorts of every candidate, the
            reference).  Default True.
        split_nearest: soft silhouette with ``faces_per_pixel``: the selection runs in two
            halves of the pixels side by side (``lib.runtime.concurrently``); False: all pixels
            at once, which costs less where the halves would run in turn anyway (e.g. on a
            thread that shares the cores with other work).  Default True.
        packed_zbuffer: z-buffer with float32 depths: one pass over int64 keys (depth bits,
            face) instead of two passes (depth, then face).  Default True.
        row_spans: z-buffer: candidate slots are each face's pixel row spans (False: its
            bounding box cut into ``raster_tile`` x ``raster_tile`` tiles).  Default True.
        raster_tile: z-buffer tile size when ``row_spans`` is False, 1..TILE.  Default 2.
        split_faces: packed z-buffer: from this many face instances the faces run as two
            halves side by side (``lib.runtime.concurrently``).  Default 4096.
        span_slots: z-buffer: row-span slots evaluated at once.  Default 2^18.
        kato_pair_chunk: hard silhouette backward: about this many (crossing, pixel) pairs
            evaluated at once.  Default 2^17.
        kato_small_block: hard silhouette backward: a block of fewer pairs than this joins a
            wider one.  Default 2^14.
    """
    cull_tiles: bool = True
    reuse_buffers: bool = True
    chunk_tiles: int = 1 << 14
    save_slots: int = 1 << 24
    radix_nearest: bool = True
    split_nearest: bool = True
    packed_zbuffer: bool = True
    row_spans: bool = True
    raster_tile: int = 2
    split_faces: int = 4096
    span_slots: int = 1 << 18
    kato_pair_chunk: int = 1 << 17
    kato_small_block: int = 1 << 14

    def __post_init__(self):
        # tiles overhanging the image must stay inside the TILE-wide padding of the layout
        if not 1 <= self.raster_tile <= TILE:
            raise ValueError(f"raster_tile must be in 1..{TILE}, got {self.raster_tile}")
        for name in ("chunk_tiles", "span_slots", "kato_pair_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


DEFAULT = RenderSettings()
