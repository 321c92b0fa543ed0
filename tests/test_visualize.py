"""lib.visualize: the original's dL/ds colours (R = f, G = 1 - f, B = 0.7; red = grow) checked
against the optimiser's own update, movie frames, target outlines, plots."""
import numpy as np
import pytest
import torch

from lib.io import read_png
from lib.isosurface import extract
from lib.optimize import LatentOptimizer, SilhouetteLoss, demo_sigma
from lib.render import face_index, look_at, look_at_eye, nr_shade, silhouette
from lib.visualize import (dl_ds_face_colors, dl_ds_scale, face_values, movie_frame, outline, plot_history,
                           signed_colors, target_outline, to_uint8)

from fields import LatentSphere

SIZE = 64


def test_signed_colors_and_scale():
    """f = clamp((d + sigma) / (2 sigma), 0, 1), colour (f, 1 - f, 0.7)."""
    sigma = 0.5
    d = torch.tensor([2.0, 0.5, 0.25, 0.0, -0.25, -0.5, -3.0])
    c = signed_colors(d, sigma)
    f = torch.tensor([1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    torch.testing.assert_close(c, torch.stack([f, 1 - f, torch.full_like(f, 0.7)], 1))
    faces = torch.tensor([[0, 1, 2], [1, 2, 3]])
    assert torch.allclose(face_values(torch.tensor([3.0, 0.0, 0.0, 3.0]), faces), torch.tensor([1.0, 1.0]))
    # sigma = 0.3 x max over FACES of |the face's mean dL/ds| (docs/compatibility.md), not over vertices:
    # face means (0.1 - 2.1 + 1.0) / 3 and (-2.1 + 1.0 + 0.5) / 3 -> max |d| = 1/3
    dl = torch.tensor([0.1, -2.1, 1.0, 0.5])
    assert dl_ds_scale(dl, faces) == pytest.approx(0.3 * 1.0 / 3)
    assert dl_ds_scale(torch.zeros(4), faces) == 1.0
    assert dl_ds_scale(dl, faces[:0]) == 1.0


def test_to_uint8_truncates_as_the_originals_pictures():
    x = torch.tensor([0.0, 0.5, 0.7 * 0.75, 0.999, 1.0, 1.5, -0.2])
    # 255 x: 0, 127.5, 133.875, 254.745, 255 -> truncated, not rounded
    assert to_uint8(x).tolist() == [0, 127, 133, 254, 255, 255, 0]


@pytest.mark.parametrize("start, goal, colour", [(0.3, 0.5, "red"), (0.5, 0.3, "green")])
def test_dl_ds_colour_sign_follows_the_update(start, goal, colour):
    """A sphere smaller than the target silhouette must be pushed outwards (red faces, radius
    grows after the Adam step); a larger one inwards (green, radius shrinks)."""
    cam = look_at(45.0, 30.0, 2.5, image_size=SIZE)
    v, f, _ = extract(lambda p: p.norm(dim=1) - goal, 24, "dense")
    target = silhouette(v, f, cam, sigma=demo_sigma(SIZE))
    opt = LatentOptimizer(LatentSphere(), torch.tensor([start]), SilhouetteLoss(cam, target), lr=0.01, resolution=24)
    it = opt.step()
    scale = dl_ds_scale(it.dl_ds, it.faces)
    colors = dl_ds_face_colors(it.dl_ds, it.faces, scale)
    active = face_values(it.dl_ds, it.faces).abs() > 0.1 * scale
    assert int(active.sum()) > 20
    red, green = colors[active, 0], colors[active, 1]
    strong = it.dl_ds[it.dl_ds.abs() > 0.01 * it.dl_ds.abs().max()]   # ignore round-off-sized values
    grew = float(opt.latent.detach()[0]) > start
    if colour == "red":
        assert (strong > 0).all() and (red > green).all() and grew
    else:
        assert (strong < 0).all() and (green > red).all() and not grew
    # the rim faces saturate: 0.3 x the max is the colour scale
    assert float(face_values(it.dl_ds, it.faces).abs().max()) > scale


def _square():
    verts = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cam = look_at_eye((0.0, 0.0, 3.0), image_size=SIZE)
    return verts, faces, cam


def test_movie_frame_is_the_lit_coloured_mesh():
    """Frames are nr_shade's RGB of the face colours on black (tested in test_nmr), as
    to_uint8 makes it, with the outline drawn over it; one gather from a uint8 table must
    give exactly that, with or without a precomputed face index, and with no faces."""
    verts, faces, cam = _square()
    colors = torch.tensor([[1.0, 0.0, 0.7], [0.3, 0.8, 0.7]])
    frame = movie_frame(verts, faces, colors, cam)
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == torch.uint8
    assert torch.equal(frame, to_uint8(nr_shade(verts, faces, cam, face_colors=colors)[..., :3]))
    assert torch.equal(frame[0, 0], torch.zeros(3, dtype=torch.uint8))      # black background
    mask = silhouette(verts, faces, cam, sigma=0) > 0.5
    assert len({tuple(px.tolist()) for px in frame[mask]}) == 2              # one colour per face
    ring = outline(mask, width=1)
    framed = movie_frame(verts, faces, colors, cam, ring, color=(1.0, 0.5, 0.25),
                         face_idx=face_index(verts, faces, cam))
    expect = to_uint8(torch.where(ring[..., None], torch.tensor([1.0, 0.5, 0.25]),
                                  nr_shade(verts, faces, cam, face_colors=colors)[..., :3]))
    assert torch.equal(framed, expect) and ring.any()
    empty = movie_frame(verts, faces[:0], colors[:0], cam, ring)
    assert torch.equal(empty, to_uint8(torch.where(ring[..., None], torch.ones(3), torch.zeros(3))))


def test_outline_ring():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[3:9, 3:9] = True
    ring = outline(mask, width=1)
    expect = torch.zeros(12, 12, dtype=torch.bool)
    expect[2:10, 2:10] = True
    expect[4:8, 4:8] = False
    assert torch.equal(ring, expect)
    assert not outline(torch.zeros(5, 5, dtype=torch.bool)).any()


def test_movie_frame_draws_target_outline():
    verts, faces, cam = _square()
    target = torch.zeros(SIZE, SIZE)
    target[10:20, 40:50] = 1.0
    edge = target_outline(target)
    assert torch.equal(edge, outline(target > 0.5, 1))
    frame = movie_frame(verts, faces, signed_colors(torch.zeros(2), 1.0), cam, edge)
    assert (frame[edge] == 255).all()                                       # white outline
    assert (frame[15, 45] == 0).all()                                       # inside the outline: background


def test_plot_history(tmp_path):
    hist = [{"iteration": i, "loss": 1.0 / (i + 1), "genus": int(i > 3), "seconds": 0.1} for i in range(8)]
    plot_history(tmp_path / "loss.png", hist, title="t", target_genus=1)
    img = read_png(tmp_path / "loss.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert np.ptp(img[..., :3]) > 100
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]                # no temp file left
