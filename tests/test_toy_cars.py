"""Toy-car family (lib.datasets.shapes) and prepare_data.py --builtin toy_cars (renders in DISN's layout)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
from lib.datasets import shapes as S
from lib.datasets import Instance, RenderSet
from lib.errors import MeshSDFError
from lib.io import read_mesh, read_png
from lib.metrics import connected_components, genus, silhouette_iou
from lib.render import read_disn_metadata, silhouette

REPO = Path(__file__).resolve().parents[1]


def test_params_are_deterministic_and_vary():
    a, b = S.toy_car_params(3), S.toy_car_params(3)
    assert a == b
    others = [S.toy_car_params(i) for i in range(6)]
    for key in ("length", "width", "cabin_offset", "wheel_radius"):
        assert len({round(p[key], 6) for p in others}) == 6
    assert S.toy_car_params(3, family_seed=1) != a


@pytest.mark.parametrize("index", [0, 7])
def test_car_is_one_closed_genus0_piece_standing_on_the_ground(index):
    p = S.toy_car_params(index)
    v, f = S.mesh_builtin(f"car_{index:03d}", 96)
    assert connected_components(f.numpy()) == 1
    assert genus(v, f) == 0
    assert float(v.norm(dim=1).max()) < 0.6
    ground = -(p["body_height"] + p["clearance"])
    assert float(v[:, 1].min()) == pytest.approx(ground, abs=0.01)  # wheels touch the ground
    # symmetric in x, longer than wide, wheels stick out below the body
    assert float(v[:, 0].max() + v[:, 0].min()) == pytest.approx(0.0, abs=0.01)
    assert float(v[:, 2].max()) > 1.5 * float(v[:, 0].max())
    car = S.toy_car(index)
    probe = torch.tensor([[0.0, ground + 0.005, 0.0],                      # under the belly: empty
                          [0.0, 0.0, 0.0]])                                # inside the body
    d = car(probe)
    assert d[0] > 0 and d[1] < 0


def test_builtin_shape_names():
    assert S.builtin_shape("car_012").name == "toy_car_12"
    assert S.builtin_shape("bob").name == "bob"
    with pytest.raises(KeyError):
        S.builtin_shape("car_x")
    assert S.toy_car_names(3) == ["car_000", "car_001", "car_002"]
    assert S.BUILTIN_DATASETS["toy_cars"] == S.toy_car_names(S.TOY_CARS_DEFAULT_COUNT)


def test_committed_toy_split_files_are_what_prepare_data_writes():
    for family, names in (("cars", S.toy_car_names(56)), ("chairs", S.toy_chair_names(56))):
        # prepare_data.py --count 56 --val-count 8 --test-count 8: test last, validation before it
        split = lambda f: json.loads((REPO / f"experiments/toy_{family}_svr/{f}.json").read_text())  # noqa: E731
        assert split("train") == {f"toy_{family}": {"samples": names[:40]}}
        assert split("val") == {f"toy_{family}": {"samples": names[40:48]}}
        assert split("test") == {f"toy_{family}": {"samples": names[48:]}}


@pytest.mark.slow
def test_prepare_toy_cars_with_renders(tmp_path):
    rc = prepare_data.main(["--builtin", "toy_cars", "--count", "3", "--views", "2", "--image-size", "32",
                            "--samples", "2000", "--resolution", "48", "--out", str(tmp_path), "--workers", "1"])
    assert rc == 0
    root = tmp_path / "toy_cars"
    names = ["car_000", "car_001", "car_002"]
    split = lambda f: json.loads((root / f).read_text())["toy_cars"]["samples"]  # noqa: E731
    assert split("split.json") == names
    assert split("split_train.json") == names[:2] and split("split_test.json") == names[2:]
    for n in names:
        assert (root / "samples" / f"{n}.npz").is_file() and (root / "meshes" / f"{n}.obj").is_file()
        d = root / "renders" / n
        assert sorted(p.name for p in d.iterdir()) == ["00.png", "01.png", "rendering_metadata.txt"]
        views = read_disn_metadata(d / "rendering_metadata.txt")
        assert len(views) == 2
        for v in views:
            assert 0 <= v.azimuth < 360 and 10 <= v.elevation <= 40 and v.inplane == 0
        img = read_png(d / "00.png")
        assert img.shape == (32, 32, 4) and img.dtype == np.uint8
        assert 0 < (img[..., 3] > 127).mean() < 0.8       # an object, not the whole frame
        assert (img[..., 3] == 0).any() and (img[..., 3] == 255).any()
    # samples, meshes and renders share one frame (as the original's SVR data): the stored
    # mesh's silhouette from the metadata's camera, with no normalisation file, is the alpha
    insts = [Instance("toy_cars", "samples", n) for n in names]
    plain = RenderSet(tmp_path, insts, 32, 2)
    for k, n in enumerate(names):
        v, f = read_mesh(root / "meshes" / f"{n}.obj")
        v, f = torch.from_numpy(v), torch.from_numpy(f)
        assert 0.9 < float(v.norm(dim=1).max()) < 1.0                 # the normalised mesh
        for view in range(2):
            alpha = plain.images(torch.tensor([k]), torch.tensor([view]))[0, 3]
            assert silhouette_iou(silhouette(v, f, plain.camera(k, view), sigma=0), alpha) > 0.9


@pytest.mark.parametrize("index", [2, 7])
def test_toy_chair_genus_varies_as_designed(index):
    p = S.toy_chair_params(index)
    v, f = S.mesh_builtin(f"chair_{index:03d}", 80)
    assert connected_components(f.numpy()) == 1
    assert genus(v, f) == S.toy_chair_genus(p)
    assert float(v.norm(dim=1).max()) < 0.55


def test_toy_chair_family_covers_every_design():
    ps = [S.toy_chair_params(i) for i in range(56)]
    assert {p["back"] for p in ps} == set(S.CHAIR_BACKS)
    assert any(p["arms"] for p in ps) and any(p["stretchers"] for p in ps)
    assert len({S.toy_chair_genus(p) for p in ps}) >= 5
    assert S.builtin_shape("chair_004").name == "toy_chair_4" and S.toy_chair_params(4) == ps[4]
    assert S.toy_chair_genus({"back": "slats", "slats": 3, "arms": True, "stretchers": False}) == 6


def test_count_and_views_errors(tmp_path):
    with pytest.raises(MeshSDFError, match="--count applies"):
        prepare_data.main(["--builtin", "bob_and_spot", "--count", "3", "--out", str(tmp_path)])
    with pytest.raises(MeshSDFError, match="--count must be at least 2"):
        prepare_data.main(["--builtin", "toy_cars", "--count", "1", "--out", str(tmp_path)])
    with pytest.raises(MeshSDFError, match="--test-count"):
        prepare_data.main(["--builtin", "toy_cars", "--count", "3", "--test-count", "3", "--out", str(tmp_path)])
    with pytest.raises(MeshSDFError, match="--views"):
        prepare_data.main(["--builtin", "toy_cars", "--views", "-1", "--out", str(tmp_path)])
    assert not (tmp_path / "toy_cars").exists()
