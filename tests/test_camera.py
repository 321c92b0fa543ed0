import math

import numpy as np
import pytest
import torch

from lib.render import (CAM_MAX_DIST, Camera, DisnView, demo_camera, disn_camera, disn_view, format_disn_line,
                        from_disn_metadata, look_at, look_at_eye, parse_disn_line, read_disn_metadata,
                        write_disn_metadata)
from lib.errors import MeshSDFError

D64 = torch.float64


@pytest.mark.parametrize("az,el,expect", [
    (0, 0, (0, 0, -1)), (90, 0, (1, 0, 0)), (180, 0, (0, 0, 1)), (-90, 0, (-1, 0, 0)),
    (0, 90, (0, 1, 0)), (45, 30, (math.cos(math.radians(30)) * math.sqrt(0.5), 0.5,
                                  -math.cos(math.radians(30)) * math.sqrt(0.5)))])
def test_look_at_eye_follows_neural_renderer_angles(az, el, expect):
    cam = look_at(az, el, 2.0, dtype=D64)
    np.testing.assert_allclose(cam.eye.numpy(), 2.0 * np.array(expect), atol=1e-12)


def test_origin_and_optical_axis_project_to_image_centre():
    cam = look_at(45, 30, 2.5, dtype=D64)
    uv, z = cam.project(torch.zeros(3, dtype=D64))
    np.testing.assert_allclose(uv.numpy(), [256.0, 256.0], atol=1e-9)
    assert float(z) == pytest.approx(2.5)
    # any point on the optical axis lands on the centre, at its distance along the axis
    fwd = -cam.eye / cam.eye.norm()
    pts = cam.eye + torch.tensor([0.5, 1.0, 4.0], dtype=D64)[:, None] * fwd
    uv, z = cam.project(pts)
    np.testing.assert_allclose(uv.numpy(), 256.0, atol=1e-9)
    np.testing.assert_allclose(z.numpy(), [0.5, 1.0, 4.0], atol=1e-12)


def test_known_pixels_from_focal_in_mm():
    # demo camera: 35 mm lens on a 32 mm sensor over 512 px -> f = 560 px
    cam = look_at(0, 0, 2.0, dtype=D64)
    assert cam.focal[0].tolist() == [560.0, 560.0]
    right, down = cam.R[0, 0], cam.R[0, 1]
    uv, _ = cam.project(torch.stack([0.1 * right, 0.1 * down]))
    np.testing.assert_allclose(uv.numpy(), [[256 + 28.0, 256.0], [256.0, 256 + 28.0]], atol=1e-9)


def test_image_axes_world_up_is_up_and_view_is_not_mirrored():
    cam = look_at(0, 0, 2.0, dtype=D64)        # at (0, 0, -2) looking towards +z
    (u_up, v_up), _ = cam.project(torch.tensor([0.0, 0.5, 0.0], dtype=D64))
    assert v_up < 256 and abs(u_up - 256) < 1e-9   # +y is up: smaller row (row 0 = top)
    # right-handed world, physical camera: looking along +z with y up, +x is on the left
    (u_x, _), _ = cam.project(torch.tensor([0.5, 0.0, 0.0], dtype=D64))
    assert u_x < 256
    # the camera frame is a proper rotation with right = forward x up
    R = cam.R[0]
    np.testing.assert_allclose((R @ R.T).numpy(), np.eye(3), atol=1e-12)
    assert float(torch.det(R)) == pytest.approx(1.0)
    np.testing.assert_allclose(R[0].numpy(), torch.cross(R[2], -R[1], dim=0).numpy(), atol=1e-12)


def test_demo_camera_is_the_originals_projection():
    """R = R_roll(180) R_el R_az and t = (0, 0, d), written out here from the original's
    matrices (numpy, float64), f = 35 W / 32, principal point (W/2, H/2); its centre is
    (-1.531, 1.25, -1.531)."""
    a, e, d = np.radians(45.0), np.radians(30.0), 2.5
    r_az = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]).T
    r_el = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]]).T
    rz180 = np.array([[np.cos(np.pi), -np.sin(np.pi), 0], [np.sin(np.pi), np.cos(np.pi), 0], [0, 0, 1]])
    R = rz180.T @ r_el @ r_az
    cam = demo_camera(dtype=D64)
    np.testing.assert_allclose(cam.R[0].numpy(), R, atol=1e-12)
    np.testing.assert_allclose(cam.t[0].numpy(), [0.0, 0.0, 2.5], atol=0)
    np.testing.assert_allclose(cam.eye.numpy(), [-1.531, 1.25, -1.531], atol=1e-3)
    np.testing.assert_allclose(cam.eye.numpy(), -R.T @ np.array([0, 0, d]), atol=1e-12)
    assert cam.focal[0].tolist() == [560.0, 560.0] and cam.principal[0].tolist() == [256.0, 256.0]
    assert demo_camera(image_size=96).focal[0].tolist() == [105.0, 105.0]
    # p_cam = R p + t through K: a point's pixel from the formula
    p = np.array([0.3, -0.2, 0.45])
    q = R @ p + np.array([0, 0, d])
    uv, z = cam.project(torch.tensor(p, dtype=D64))
    np.testing.assert_allclose(uv.numpy(), [560 * q[0] / q[2] + 256, 560 * q[1] / q[2] + 256], atol=1e-9)
    # what the picture looks like: world +y up, not mirrored, the same view as a look-at
    # from the same centre (our look-at angles: azimuth -45)
    (u0, v0), _ = cam.project(torch.zeros(3, dtype=D64))
    (_, v_up), _ = cam.project(torch.tensor([0.0, 0.5, 0.0], dtype=D64))
    assert abs(float(u0) - 256) < 1e-9 and float(v_up) < float(v0)
    np.testing.assert_allclose(cam.R.numpy(), look_at(-45.0, 30.0, 2.5, dtype=D64).R.numpy(), atol=1e-12)
    assert float(torch.det(cam.R[0])) == pytest.approx(1.0)


def test_straight_above_is_defined():
    cam = look_at(30, 90, 2.0, dtype=D64)
    uv, z = cam.project(torch.zeros(3, dtype=D64))
    np.testing.assert_allclose(uv.numpy(), [256, 256], atol=1e-9)
    # the limit el -> 90 of the usual camera
    near = look_at(30, 90 - 1e-7, 2.0, dtype=D64)
    np.testing.assert_allclose(cam.R.numpy(), near.R.numpy(), atol=1e-6)


def test_batched_cameras_and_indexing():
    cams = look_at([0, 90, 180], 20, [2.0, 2.5, 3.0], image_size=(60, 80), dtype=D64)
    assert cams.batched and len(cams) == 3
    pts = torch.randn(5, 3, dtype=D64)
    uv, z = cams.project(pts)
    assert uv.shape == (3, 5, 2) and z.shape == (3, 5)
    for i in range(3):
        uvi, zi = cams[i].project(pts)
        np.testing.assert_allclose(uv[i].numpy(), uvi.numpy(), atol=1e-9)
        np.testing.assert_allclose(z[i].numpy(), zi.numpy(), atol=1e-12)
    # one point set per camera
    per = torch.randn(3, 4, 3, dtype=D64)
    uv2, _ = cams.project(per)
    np.testing.assert_allclose(uv2[1].numpy(), cams[1].project(per[1])[0].numpy(), atol=1e-9)
    stacked = Camera.stack([cams[0], cams[2]])
    np.testing.assert_allclose(stacked.R[1].numpy(), cams.R[2].numpy())
    # non-square: principal point at the centre, focal from the longer side (80 px)
    assert cams.principal[0].tolist() == [40.0, 30.0]
    assert cams.focal[0, 0].item() == pytest.approx(35 / 32 * 80)


def test_resized_scales_pixels():
    cam = look_at(20, 10, 2.0, image_size=100, dtype=D64)
    p = torch.tensor([0.3, -0.2, 0.1], dtype=D64)
    uv, _ = cam.project(p)
    uv2, _ = cam.resized((200, 300)).project(p)
    np.testing.assert_allclose(uv2.numpy(), uv.numpy() * np.array([3.0, 2.0]), atol=1e-9)


def _blender_reference(az, el, ratio, pts):
    """Independent composition of DISN's Blender camera (Choy et al. / getBlenderProj
    steps): ShapeNet y-up -> Blender z-up, world -> frame with the camera on +x, camera at
    (d, 0, 0) looking at -x with +z up, OpenCV axes; K from 35/32 mm at 224 px."""
    a, e = math.radians(az), math.radians(el)
    to_blender = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0.0]])          # +90 deg about x
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(e), 0, math.sin(e)], [0, 1, 0], [-math.sin(e), 0, math.cos(e)]])
    obj_to_cam = np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0.0]])
    R = obj_to_cam @ ry @ rz @ to_blender
    t = np.array([0, 0, ratio * CAM_MAX_DIST])
    f = 35.0 * 224 / 32
    K = np.array([[f, 0, 112], [0, f, 112], [0, 0, 1.0]])
    x = (K @ (pts @ R.T + t).T).T
    return x[:, :2] / x[:, 2:], (pts @ R.T + t)[:, 2]


@pytest.mark.parametrize("az,el,ratio", [(0, 0, 0.8), (37.5, 25.0, 0.9), (200.0, -10.0, 0.7), (315, 40, 1.0)])
def test_disn_camera_matches_blender_composition(az, el, ratio):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.5, 0.5, (20, 3))
    uv_ref, z_ref = _blender_reference(az, el, ratio, pts)
    cam = from_disn_metadata(f"{az} {el} 0 {ratio} 25", dtype=D64)
    assert cam.image_size == (224, 224)
    uv, z = cam.project(torch.from_numpy(pts))
    np.testing.assert_allclose(uv.numpy(), uv_ref, atol=1e-8)
    np.testing.assert_allclose(z.numpy(), z_ref, atol=1e-10)


def test_disn_azimuth_is_neural_renderer_azimuth_minus_90():
    a = look_at(70, 20, 1.4, image_size=224, dtype=D64)
    b = disn_camera(70 - 90, 20, 1.4 / CAM_MAX_DIST, dtype=D64)
    np.testing.assert_allclose(a.R.numpy(), b.R.numpy(), atol=1e-12)
    np.testing.assert_allclose(a.t.numpy(), b.t.numpy(), atol=1e-12)


def test_disn_metadata_round_trip(tmp_path):
    az = [0.0, 45.5, 123.25, 359.0]
    el = [10.0, 25.0, -5.0, 30.0]
    ratio = [0.8, 0.65, 0.9, 1.0]
    cams = disn_camera(az, el, ratio, dtype=D64)
    p = tmp_path / "rendering_metadata.txt"
    write_disn_metadata(p, cams)
    views = read_disn_metadata(p)
    np.testing.assert_allclose([v.azimuth for v in views], az, atol=1e-7)
    np.testing.assert_allclose([v.elevation for v in views], el, atol=1e-7)
    np.testing.assert_allclose([v.distance_ratio for v in views], ratio, atol=1e-9)
    back = from_disn_metadata(p, dtype=D64)
    np.testing.assert_allclose(back.R.numpy(), cams.R.numpy(), atol=1e-9)
    np.testing.assert_allclose(back.t.numpy(), cams.t.numpy(), atol=1e-9)
    one = from_disn_metadata(p, index=2, dtype=D64)
    assert not one.batched
    np.testing.assert_allclose(one.eye.numpy(), cams.eye[2].numpy(), atol=1e-9)
    # a line round-trips through format/parse, brackets and commas accepted
    v = DisnView(12.5, 30.0, 0.0, 0.75, 25.0)
    assert parse_disn_line(format_disn_line(v)) == v
    assert parse_disn_line("[12.5, 30.0, 0, 0.75, 25, 1, 2]") == v
    # neural_renderer-style demo cameras are also expressible (focal 35/32)
    assert disn_view(look_at(100, 20, 1.5, image_size=224, dtype=D64)).azimuth == pytest.approx(10.0)


def test_disn_view_rejects_inexpressible_cameras():
    with pytest.raises(ValueError, match="origin"):
        disn_view(look_at_eye([1.0, 0.5, 1.0], target=[0.2, 0, 0], image_size=224, focal_mm=35, sensor_mm=32))
    with pytest.raises(ValueError, match="focal"):
        disn_view(look_at(0, 0, 2.0, image_size=224, focal_mm=50))


@pytest.mark.parametrize("content,lineno,needle", [
    ("0 10 0 0.8 25\n45 x 0 0.8 25\n", 2, "not a number"),
    ("0 10 0 0.8\n", 1, "expected 5 numbers"),
    ("0 10 0 -0.8 25\n", 1, "distance ratio"),
    ("0 10 0 nan 25\n", 1, "non-finite")])
def test_malformed_metadata_names_file_and_line(tmp_path, content, lineno, needle):
    p = tmp_path / "rendering_metadata.txt"
    p.write_text(content)
    with pytest.raises(MeshSDFError) as err:
        from_disn_metadata(p)
    msg = str(err.value)
    assert str(p) in msg and f"line {lineno}" in msg and needle in msg


def test_metadata_missing_file_and_bad_index(tmp_path):
    with pytest.raises(MeshSDFError, match="not found"):
        read_disn_metadata(tmp_path / "nope.txt")
    p = tmp_path / "m.txt"
    p.write_text("0 10 0 0.8 25\n")
    with pytest.raises(MeshSDFError, match="view 3"):
        from_disn_metadata(p, index=3)


@pytest.mark.parametrize("old, new", [("lib.camera", "lib.render.camera"), ("lib.nmr", "lib.render.hard_silhouette")])
def test_old_module_paths_warn_and_reexport(old, new):
    """lib/camera.py and lib/nmr.py (documented paths before lib/render/) still import, with a
    DeprecationWarning, and give the very objects of their new modules."""
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new):
        mod = importlib.import_module(old)
    moved = importlib.import_module(new)
    assert mod.__all__ == moved.__all__ and len(mod.__all__) > 3
    assert all(getattr(mod, name) is getattr(moved, name) for name in moved.__all__)
