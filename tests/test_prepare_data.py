"""prepare_data.py end to end: layout of docs/data.md, split file, bad inputs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from lib.datasets import shapes as S
from lib.errors import MeshSDFError
from lib.io import read_mesh, write_obj, write_ply
from lib.datasets.sampling import read_normalization

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    v, f = S.mesh_shape(S.torus(0.5, 0.2), 40)
    write_obj(d / "ring.obj", v * 3.0 + 1.0, f)
    v, f = S.mesh_shape(S.box((0.5, 0.3, 0.4)), 32)
    write_ply(d / "brick.ply", v, f)
    return d


def _listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_mesh_files_to_dataset(meshes, tmp_path):
    rc = prepare_data.main(["--mesh", str(meshes / "ring.obj"), str(meshes / "brick.ply"),
                            "--dataset", "toys", "--out", str(tmp_path), "--samples", "2000"])
    assert rc == 0
    root = tmp_path / "toys"
    assert _listing(tmp_path) == sorted([
        "toys/split.json", "toys/meshes/ring.obj", "toys/meshes/brick.obj",
        "toys/samples/ring.npz", "toys/samples/brick.npz",
        "toys/samples/ring_normalization.npz", "toys/samples/brick_normalization.npz"])
    assert json.loads((root / "split.json").read_text()) == {"toys": {"samples": ["ring", "brick"]}}
    with np.load(root / "samples" / "ring.npz") as z:
        assert set(z.files) == {"pos", "neg"}
        pos, neg = z["pos"], z["neg"]
    assert pos.dtype == np.float32 and pos.shape[1] == 4 and len(pos) + len(neg) == 2000
    assert (pos[:, 3] >= 0).all() and (neg[:, 3] < 0).all()
    # the written mesh is the normalised input, and the stored normalisation maps it back
    orig, f0 = read_mesh(meshes / "ring.obj")
    norm_v, f1 = read_mesh(root / "meshes" / "ring.obj")
    assert np.array_equal(f0, f1)
    n = read_normalization(root / "samples" / "ring_normalization.npz")
    assert np.allclose(n.invert(norm_v), orig, atol=1e-5)
    assert np.linalg.norm(norm_v, axis=1).max() == pytest.approx(1 / 1.03, abs=1e-5)
    # the ring (scaled by 3 then normalised) keeps its hole: the centre is outside
    assert np.allclose(n.apply(np.array([[1.0, 1.0, 1.0]])), 0, atol=1e-5)


def _bad(args, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(MeshSDFError, match=match):
        prepare_data.main(args + ["--out", str(out), "--samples", "100"])
    assert not out.exists() or _listing(out) == []  # nothing written, not even half


def test_bad_inputs(meshes, tmp_path):
    good = str(meshes / "ring.obj")
    (tmp_path / "empty.obj").write_text("")
    (tmp_path / "garbage.obj").write_text("this is not a mesh\n")
    (tmp_path / "cloud.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
                                        "property float y\nproperty float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n")
    (tmp_path / "nan.obj").write_text("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "flat.obj").write_text("v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    for name, match in [("missing.obj", "missing.obj"), ("empty.obj", "empty.obj"),
                        ("garbage.obj", "garbage.obj"), ("cloud.ply", "cloud.ply"),
                        ("nan.obj", "nan.obj.*NaN"), ("flat.obj", "flat.obj"), ("notes.txt", "notes.txt")]:
        # a good mesh first: it must not be written when a later one is bad
        _bad(["--mesh", good, str(tmp_path / name), "--dataset", "d"], tmp_path, match)
    _bad(["--mesh", good, str(meshes / "ring.obj"), "--dataset", "d"], tmp_path, "ring")  # same instance twice
    _bad(["--mesh", good], tmp_path, "--dataset")
    _bad(["--mesh", good, "--dataset", "a/b"], tmp_path, "dataset")
    _bad(["--mesh", good, "--dataset", "d", "--workers", "0"], tmp_path, "--workers")
    # output folder that cannot be created: its parent is a file
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MeshSDFError, match="afile"):
        prepare_data.main(["--mesh", good, "--dataset", "d", "--out", str(tmp_path / "afile" / "out")])


def test_cli_exit_code_and_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--mesh", str(tmp_path / "nope.obj"),
                        "--dataset", "d", "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "nope.obj" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_builtin_bob_and_spot_with_workers(tmp_path):
    rc = prepare_data.main(["--builtin", "bob_and_spot", "--out", str(tmp_path), "--samples", "3000",
                            "--resolution", "64", "--workers", "2"])
    assert rc == 0
    root = tmp_path / "bob_and_spot"
    assert json.loads((root / "split.json").read_text()) == {"bob_and_spot": {"samples": ["bob", "spot"]}}
    from lib.metrics import genus

    for name, g in [("bob", 1), ("spot", 0)]:
        v, f = read_mesh(root / "meshes" / f"{name}.obj")
        assert genus(v, f) == g
        assert np.linalg.norm(v, axis=1).max() == pytest.approx(1 / 1.03, abs=1e-5)
        with np.load(root / "samples" / f"{name}.npz") as z:
            assert len(z["pos"]) + len(z["neg"]) == 3000 and len(z["neg"]) > 300
        if name == "spot":
            # turned as the original's spot (docs/compatibility.md): head, ears and horns towards -x
            top = v[v[:, 1] > np.percentile(v[:, 1], 90)]
            assert top[:, 0].mean() < -0.25 and abs(top[:, 2].mean()) < 0.05


def test_rotate_y_turns_a_mesh_before_it_is_normalised(tmp_path):
    """--rotate-y spot=90: (x, y, z) -> (z, y, -x), then centred and scaled (docs/compatibility.md); the
    other meshes are left as they are."""
    from lib.datasets.sampling import normalization, rotate_about_y

    src = tmp_path / "in"
    v, f = S.mesh_shape(S.box((0.4, 0.3, 0.2)) | S.sphere(0.25, (0.0, 0.25, 0.5)), 40)   # a raised bump at +z
    v = v.numpy() + np.array([0.3, 0.1, -0.2], dtype=np.float32)
    write_obj(src / "spot.obj", v, f)
    write_obj(src / "bob.obj", v, f)
    rc = prepare_data.main(["--mesh", str(src / "bob.obj"), str(src / "spot.obj"), "--dataset", "d",
                            "--out", str(tmp_path / "o"), "--samples", "500", "--rotate-y", "spot=90"])
    assert rc == 0
    v0, f0 = read_mesh(src / "spot.obj")
    bob, _ = read_mesh(tmp_path / "o" / "d" / "meshes" / "bob.obj")
    spot, f1 = read_mesh(tmp_path / "o" / "d" / "meshes" / "spot.obj")
    assert np.array_equal(f0, f1)
    # the top of the bump: at +z in bob (not turned), at +x in spot
    top_bob, top_spot = bob[bob[:, 1].argmax()], spot[spot[:, 1].argmax()]
    assert top_bob[2] > 0.2 and abs(top_bob[0]) < 0.05 and top_spot[0] > 0.2 and abs(top_spot[2]) < 0.05
    turned = v0[:, [2, 1, 0]] * np.array([1.0, 1.0, -1.0])
    assert np.allclose(spot, normalization(turned, f0).apply(turned), atol=1e-5)
    assert np.allclose(rotate_about_y(np.array([[1.0, 2.0, 3.0]]), 90.0), [[3.0, 2.0, -1.0]])
    # the normalisation file is that of the turned mesh
    n = read_normalization(tmp_path / "o" / "d" / "samples" / "spot_normalization.npz")
    assert np.allclose(n.invert(spot), turned, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    (["--rotate-y", "cow=90"], r"--rotate-y 'cow=90': no instance 'cow' among ring"),
    (["--rotate-y", "ring"], r"--rotate-y 'ring': expected INSTANCE=DEGREES"),
    (["--rotate-y", "ring=abc"], r"expected INSTANCE=DEGREES"),
    (["--rotate-y", "ring=90", "--rotate-y", "ring=10"], r"names 'ring' twice"),
])
def test_bad_rotate_y(meshes, tmp_path, args, match):
    with pytest.raises(MeshSDFError, match=match):
        prepare_data.main(["--mesh", str(meshes / "ring.obj"), "--dataset", "d", "--out", str(tmp_path / "o"),
                           *args])
    assert not (tmp_path / "o" / "d" / "samples").exists() or not any((tmp_path / "o" / "d").rglob("*.npz"))
    with pytest.raises(MeshSDFError, match="--rotate-y applies to --mesh only"):
        prepare_data.main(["--builtin", "bob_and_spot", "--out", str(tmp_path / "o"), "--rotate-y", "spot=90"])


def test_sample_mix_option(meshes, tmp_path):
    """--sample-mix picks lib.datasets.sampling's mix; the default is DeepSDF's preprocessor's."""
    from lib.datasets.sampling import normalization, sample_sdf

    v, f = read_mesh(meshes / "brick.ply")
    nv = normalization(v, f).apply(v)
    for extra, mix in (([], "deepsdf"), (["--sample-mix", "paper"], "paper")):
        out = tmp_path / mix
        assert prepare_data.main(["--mesh", str(meshes / "brick.ply"), "--dataset", "d", "--out", str(out),
                                  "--samples", "1000", *extra]) == 0
        pos, neg = sample_sdf(nv, np.asarray(f, dtype=np.int64), 1000, 0, mix)
        with np.load(out / "d" / "samples" / "brick.npz") as z:
            assert np.array_equal(z["pos"], pos) and np.array_equal(z["neg"], neg)
