"""Pictures of an optimisation: dL/ds face colours, shaded movie frames, metric plots.

dL/ds colours, as the original demo's movie.gif (docs/demo.md): per face, d = the mean dL/ds of
its three vertices, and sigma = 0.3 x the first iteration's max |d| over faces (``dl_ds_scale``),

    f = clamp((d + sigma) / (2 sigma), 0, 1),   colour (R, G, B) = (f, 1 - f, 0.7)

so dL/ds = +sigma or more is magenta-ish red (1, 0, 0.7), -sigma or less cyan-ish green
(0, 1, 0.7), 0 in between (0.5, 0.5, 0.7).  The SDF s is > 0 outside, so dL/ds > 0 (red)
means gradient descent lowers s there: the surface GROWS outwards; dL/ds < 0 (green) it
shrinks inwards.  Frames are lit like the original's (``lib.render.nr_shade``) on its black
background; the target silhouette's outline can be drawn over them (demo option --outline).

Images are float arrays in [0, 1] (torch tensors on the mesh's device until ``to_uint8``,
which truncates 255 x value as the original's pictures do),
movie frames uint8 on the mesh's device;
row 0 is the top row (lib.render.camera conventions).  Plots use matplotlib's Agg canvas.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from .io import atomic_write

from .render import Camera, face_index, nr_face_rgb

BLUE_CHANNEL = 0.7             # the constant B of the original's frames
OUTLINE = (1.0, 1.0, 1.0)
SCALE_FRACTION = 0.3           # sigma = 0.3 x the first iteration's max |dL/ds|


def dl_ds_scale(dl_ds: torch.Tensor, faces: torch.Tensor, fraction: float = SCALE_FRACTION) -> float:
    """sigma from the first iteration's per-vertex dL/ds (V,) on faces (F, 3): fraction * the
    max over faces of |the face's mean dL/ds| (the values that are coloured, as the original).

    Returns 1.0 when every value is 0 (no gradient), so colours stay neutral.
    """
    peak = float(face_values(dl_ds.detach(), faces).abs().max()) if faces.numel() else 0.0
    return fraction * peak if peak > 0 else 1.0


def face_values(per_vertex: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per-face mean (F,) of a per-vertex quantity (V,)."""
    return per_vertex.index_select(0, faces.reshape(-1)).view(faces.shape).mean(dim=1)


def signed_colors(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """RGB (N, 3) = (f, 1 - f, 0.7) with f = clamp((values + sigma) / (2 sigma), 0, 1)."""
    f = ((values.detach() + sigma) / (2.0 * sigma)).clamp(0.0, 1.0)
    return torch.stack([f, 1.0 - f, torch.full_like(f, BLUE_CHANNEL)], dim=1)


def dl_ds_face_colors(dl_ds: torch.Tensor, faces: torch.Tensor, sigma: float) -> torch.Tensor:
    """Face colours (F, 3) of per-vertex dL/ds (V,) with the convention of the module doc."""
    return signed_colors(face_values(dl_ds, faces), sigma)


def outline(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Pixels (H, W) bool within ``width`` pixels of the border of a boolean mask (H, W)."""
    m = mask.float()[None, None]
    k = 2 * width + 1
    dilated = torch.nn.functional.max_pool2d(m, k, stride=1, padding=width)
    eroded = -torch.nn.functional.max_pool2d(-m, k, stride=1, padding=width)
    return (dilated > 0.5)[0, 0] & ~(eroded > 0.5)[0, 0]


def outline_width(image_size: int) -> int:
    """Outline half-width in pixels: 1 up to 384 pixels, 2 at 512."""
    return max(1, round(image_size / 384))


def target_outline(target_silhouette: torch.Tensor) -> torch.Tensor:
    """Outline pixels (H, W) bool of a target silhouette (H, W) binarised at 0.5 (computed
    once per run; ``movie_frame`` draws it)."""
    return outline(target_silhouette > 0.5, outline_width(min(target_silhouette.shape[-2:])))


def movie_frame(verts: torch.Tensor, faces: torch.Tensor, face_colors: torch.Tensor, camera: Camera,
                outline_mask: torch.Tensor | None = None, color=OUTLINE,
                face_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Movie frame (H, W, 3) uint8: the mesh with face colours (F, 3) lit as neural_renderer
    lights it (``lib.render.nr_shade``'s RGB, black background) and, if given, ``outline_mask``
    (H, W) bool (e.g. ``target_outline(target)``) drawn over it in ``color``.  face_idx
    (H, W): the visible faces of this mesh and camera if already known
    (``lib.render.face_index``; the demo's loss renderer has them), which saves the z-buffer.

    Equal to ``to_uint8`` of the float picture, made cheaper: the lit face colours, the
    background and the outline colour are one small uint8 table, and the frame is one gather
    from it (``to_uint8`` is per value, so converting the table first changes nothing).
    """
    verts = verts.detach()
    faces = torch.as_tensor(faces, device=verts.device).long()
    fidx = face_idx if face_idx is not None else face_index(verts, faces, camera)
    H, W = fidx.shape[-2:]
    rgb = nr_face_rgb(verts, faces, camera, face_colors=face_colors) if faces.shape[0] else verts.new_zeros(0, 3)
    ink = torch.tensor([color], dtype=rgb.dtype, device=rgb.device)
    table = to_uint8(torch.cat([rgb.new_zeros(1, 3), rgb, ink]))       # background, faces, outline
    # rows of 4 bytes gathered as one int32 each: faster than gathering 3-byte rows
    table = torch.cat([table, table.new_zeros(table.shape[0], 1)], 1).view(torch.int32)
    slot = fidx + 1
    if outline_mask is not None:
        slot = torch.where(outline_mask.to(slot.device), faces.shape[0] + 1, slot)
    return table.index_select(0, slot.reshape(-1)).view(torch.uint8).view(H, W, 4)[..., :3].contiguous()


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] as uint8 = 255 x value truncated (as the original's pictures),
    on its device (GIF frames kept until the end, so a GPU run copies them to the host once,
    not every iteration)."""
    return (image.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def plot_history(path: str | os.PathLike, history: Sequence[Mapping], title: str = "",
                 target_genus: int | None = None) -> None:
    """PNG with three panels over the iterations: loss (log scale), genus, seconds per iteration.

    history: records with keys ``loss``, ``genus`` and ``seconds`` (lib.optimize records);
    target_genus: drawn as a dashed line on the genus panel.  Written atomically.
    """
    # a bare Figure on the Agg canvas: no pyplot (its import and global state cost more than
    # drawing this plot)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    it = [r.get("iteration", i) for i, r in enumerate(history)]
    fig = Figure(figsize=(6, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    loss = [r["loss"] for r in history]
    axes[0].plot(it, loss, color="tab:red")
    if loss and min(loss) > 0:
        axes[0].set_yscale("log")
    axes[0].set_ylabel("loss")
    axes[1].step(it, [r["genus"] for r in history], where="post", color="tab:blue", label="mesh")
    if target_genus is not None:
        axes[1].axhline(target_genus, color="k", linestyle="--", linewidth=1, label="target")
        axes[1].legend(loc="best", fontsize=8)
    axes[1].set_ylabel("genus")
    axes[2].plot(it, [r["seconds"] for r in history], color="tab:green")
    axes[2].set_ylabel("seconds / iteration")
    axes[2].set_xlabel("iteration")
    axes[2].set_ylim(bottom=0)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
