import json

import numpy as np
import pytest
import torch

from lib.datasets import Instance, SdfSamples, read_sdf_samples, read_split, scene_batches
from lib.errors import MeshSDFError


def _write_scene(root, name, scene_id, n_pos=500, n_neg=300, nan_rows=0, dataset="ds"):
    """Rows encode their scene in x (= scene_id) and their sign in sdf."""
    rng = np.random.default_rng(scene_id)
    pos = np.column_stack([np.full(n_pos, scene_id), rng.uniform(-1, 1, (n_pos, 2)), rng.uniform(0.01, 0.1, n_pos)])
    neg = np.column_stack([np.full(n_neg, scene_id), rng.uniform(-1, 1, (n_neg, 2)), -rng.uniform(0.01, 0.1, n_neg)])
    pos[:, 1] = np.arange(n_pos)  # row id, to check coverage
    if nan_rows:
        pos[:nan_rows, 3] = np.nan
        neg[:nan_rows, 0] = np.nan
    path = root / dataset / "samples" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, pos=pos.astype(np.float32), neg=neg.astype(np.float32))
    return path


def test_read_split_order_and_errors(tmp_path):
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"ds": {"samples": ["b", "a"], "other": ["c"]}}))
    assert read_split(f) == [Instance("ds", "samples", "b"), Instance("ds", "samples", "a"),
                             Instance("ds", "other", "c")]
    assert Instance("ds", "samples", "b").samples_path("data").as_posix() == "data/ds/samples/b.npz"
    with pytest.raises(MeshSDFError, match="split file not found"):
        read_split(tmp_path / "none.json")
    f.write_text(json.dumps({"ds": {"samples": []}}))
    with pytest.raises(MeshSDFError, match="lists no instances"):
        read_split(f)
    f.write_text(json.dumps({"ds": ["a", "b"]}))
    with pytest.raises(MeshSDFError, match="dataset -> class -> list"):
        read_split(f)


def test_nan_rows_are_removed(tmp_path):
    path = _write_scene(tmp_path, "a", 0, n_pos=50, n_neg=40, nan_rows=7)
    pos, neg = read_sdf_samples(path)
    assert pos.shape == (43, 4) and neg.shape == (33, 4) and pos.dtype == torch.float32
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all()


def test_bad_files_give_clear_errors(tmp_path):
    missing = tmp_path / "bob_and_spot" / "samples" / "bob.npz"
    with pytest.raises(MeshSDFError) as err:
        SdfSamples(tmp_path, [Instance("bob_and_spot", "samples", "bob")])
    assert str(missing) in str(err.value) and "python prepare_data.py --builtin bob_and_spot" in str(err.value)
    bad = tmp_path / "x.npz"
    np.savez(bad, pos=np.zeros((5, 3), np.float32), neg=np.zeros((5, 4), np.float32))
    with pytest.raises(MeshSDFError, match=r"'pos' has shape \(5, 3\)"):
        read_sdf_samples(bad)
    np.savez(bad, pos=np.zeros((5, 4), np.float32))
    with pytest.raises(MeshSDFError, match="no 'neg' array"):
        read_sdf_samples(bad)
    np.savez(bad, pos=np.zeros((5, 4), np.float32), neg=np.full((5, 4), np.nan, np.float32))
    with pytest.raises(MeshSDFError, match="'neg' has no finite rows"):
        read_sdf_samples(bad)
    bad.write_bytes(b"not a zip")
    with pytest.raises(MeshSDFError, match="cannot read SDF samples"):
        read_sdf_samples(bad)


def test_sampling_is_half_pos_half_neg_from_the_right_scene(tmp_path):
    for k, name in enumerate(["a", "b", "c"]):
        _write_scene(tmp_path, name, k, n_pos=500 + 100 * k, n_neg=300, nan_rows=5)
    data = SdfSamples(tmp_path, [Instance("ds", "samples", n) for n in "abc"])
    assert len(data) == 3 and data.names == ["a", "b", "c"]
    gen = torch.Generator().manual_seed(0)
    scenes = torch.tensor([2, 0])
    xyz, sdf = data.sample(scenes, 4001, gen)
    assert xyz.shape == (2, 4001, 3) and sdf.shape == (2, 4001)
    assert (sdf[:, :2000] > 0).all() and (sdf[:, 2000:] < 0).all()  # S // 2 from pos, the rest from neg
    assert (xyz[0, :, 0] == 2).all() and (xyz[1, :, 0] == 0).all()
    assert torch.isfinite(xyz).all() and torch.isfinite(sdf).all()
    # uniform over the finite rows: many draws hit nearly every row of scene 2's pos array
    xyz, _ = data.sample(torch.tensor([2] * 20), 4000, gen)
    rows = xyz[:, :2000, 1].reshape(-1).long()
    assert rows.min() >= 5 and rows.max() <= 699
    assert len(rows.unique()) > 0.99 * 695
    # reproducible with the generator
    a = data.sample(scenes, 100, torch.Generator().manual_seed(5))
    b = data.sample(scenes, 100, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_scene_batches_cover_every_scene_once():
    gen = torch.Generator().manual_seed(0)
    batches = scene_batches(7, 3, gen)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(torch.cat(batches).tolist()) == list(range(7))


def test_each_scene_owns_its_documented_slices_of_the_row_table(tmp_path):
    # rows[pos_start[k] : + pos_count[k]] are scene k's pos rows as read, likewise neg
    for k, (p, q) in enumerate([(500, 300), (40, 70), (120, 9)]):
        _write_scene(tmp_path, f"s{k}", k, n_pos=p, n_neg=q)
    data = SdfSamples(tmp_path, [Instance("ds", "samples", f"s{k}") for k in range(3)])
    for k in range(3):
        pos, neg = read_sdf_samples(tmp_path / "ds" / "samples" / f"s{k}.npz")
        for start, count, want in ((data.pos_start, data.pos_count, pos), (data.neg_start, data.neg_count, neg)):
            got = data.rows[int(start[k]): int(start[k]) + int(count[k])]
            assert torch.equal(got, want)


def test_datasets_package_exports_its_modules_names():
    import importlib

    import lib.datasets as ds

    for name in ds.__all__:
        assert hasattr(ds, name), name
    for sub in ("splits", "samples", "images", "renders"):
        mod = importlib.import_module(f"lib.datasets.{sub}")
        for name in mod.__all__:
            assert hasattr(mod, name), f"{sub}.{name}"
            if name in ds.__all__:
                assert getattr(ds, name) is getattr(mod, name), name
