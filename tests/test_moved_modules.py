"""Old import paths of moved modules: each warns (DeprecationWarning) and gives the new module's objects."""
import importlib
import sys

import pytest

MOVED = [("lib.models.fused", "lib.models.kernels.fused"),
         ("lib.models.inference", "lib.models.kernels.inference"),
         ("lib.models.ops", "lib.models.kernels.elementwise"),
         ("lib.meshsdf", "lib.layer"),
         ("lib.gradient_check", "lib.layer.gradient_check")]


@pytest.mark.parametrize("old,new", MOVED)
def test_old_path_warns_and_reexports_the_public_names(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import, so the warning fires
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        shim = importlib.import_module(old)
    moved = importlib.import_module(new)
    assert sorted(shim.__all__) == sorted(moved.__all__)
    for name in moved.__all__:
        assert getattr(shim, name) is getattr(moved, name), name


def test_isosurface_keeps_every_name_its_callers_import():
    import lib.isosurface as iso

    for name in ["MODES", "ExtractionState", "dense_grid", "extract", "extract_dense", "grid_points",
                 "marching_cubes", "marching_cubes_cells", "same_mesh", "tables", "voxel_size",
                 "_BlockGrid", "_sentinel_seeds"]:
        assert hasattr(iso, name), name
    assert set(iso.__all__) <= set(dir(iso))
    assert callable(iso.extract)  # the function, not a submodule of that name


def test_moved_function_of_a_kept_module_warns_and_is_the_new_one():
    """``lib.render.screen`` stays; its ``flat_nonzero`` moved to ``lib.ops.indexing``."""
    import lib.render.screen as screen
    from lib.ops.indexing import flat_nonzero

    with pytest.warns(DeprecationWarning, match=r"lib\.ops\.indexing"):
        from lib.render.screen import flat_nonzero as old
    assert old is flat_nonzero
    with pytest.raises(AttributeError):
        screen.no_such_name
