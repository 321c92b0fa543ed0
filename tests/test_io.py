import json

import numpy as np
import pytest
import torch

from lib.errors import MeshSDFError
from lib.io import atomic_write, read_mesh, read_png, save_gif, save_png, write_obj, write_ply


def _tetra():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int64)
    return v, f


@pytest.mark.parametrize("ext", ["ply", "obj"])
def test_mesh_round_trip(tmp_path, ext):
    v, f = _tetra()
    p = tmp_path / f"m.{ext}"
    (write_ply if ext == "ply" else write_obj)(p, torch.from_numpy(v), torch.from_numpy(f))
    v2, f2 = read_mesh(p)
    np.testing.assert_allclose(v2, v, atol=1e-6)
    np.testing.assert_array_equal(f2, f)
    assert [x.name for x in tmp_path.iterdir()] == [p.name]  # no temp file left


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_png_and_gif_round_trip(tmp_path):
    img = np.zeros((8, 10), np.float32)
    img[2:5, 3:7] = 1.0
    save_png(tmp_path / "a.png", img)
    back = read_png(tmp_path / "a.png")
    assert back.shape[:2] == (8, 10)
    assert (back.reshape(8, 10, -1)[..., 0] > 127).sum() == 12
    save_gif(tmp_path / "m.gif", [img, 1 - img])
    import imageio.v3 as iio
    frames = iio.imread(tmp_path / "m.gif", index=None)
    assert frames.shape[0] == 2
    grey = frames[..., 0] if frames.ndim == 4 else frames
    assert np.array_equal(grey[0] > 127, img > 0.5) and np.array_equal(grey[1] > 127, img < 0.5)


def test_gif_keeps_colours_frames_timing_and_loop(tmp_path):
    """RGB movie frames (a few flat colours on black, as the demo's) come back with every
    pixel within a few levels, in order, at the requested frame rate, looping."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    frames = []
    for k in range(3):
        f = np.zeros((24, 32, 3), np.uint8)
        for c in range(12):
            f[2 * c : 2 * c + 2, 2 * k : 2 * k + 20] = colours[c]
        frames.append(f)
    save_gif(tmp_path / "c.gif", frames, fps=4)
    with Image.open(tmp_path / "c.gif") as im:
        assert im.n_frames == 3 and im.info["loop"] == 0 and im.info["duration"] == 250
        back = []
        for k in range(3):
            im.seek(k)
            back.append(np.asarray(im.convert("RGB")))
    assert np.abs(np.stack(back).astype(int) - np.stack(frames)).max() <= 4


def test_bad_mesh_files(tmp_path):
    with pytest.raises(MeshSDFError, match="not found"):
        read_mesh(tmp_path / "missing.obj")
    junk = tmp_path / "junk.obj"
    junk.write_text("this is not a mesh\n")
    with pytest.raises(MeshSDFError, match="junk.obj"):
        read_mesh(junk)
    nan = tmp_path / "nan.obj"
    nan.write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshSDFError, match="NaN"):
        read_mesh(nan)
    with pytest.raises(MeshSDFError, match="bad.png"):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
        read_png(tmp_path / "bad.png")


def test_atomic_write_gives_usual_permissions(tmp_path):
    import os
    p = tmp_path / "x.txt"
    with atomic_write(p) as tmp:
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_palette_png_with_transparency_reads_as_rgba(tmp_path):
    """A palette PNG whose tRNS chunk makes some entries transparent: its alpha is the tRNS values."""
    from PIL import Image

    idx = np.zeros((6, 8), np.uint8)
    idx[2:4, 3:6] = 1
    idx[0, 0] = 2
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 200, 120, 40, 10, 20, 30] + [0] * 759)
    im.save(tmp_path / "p.png", transparency=bytes([0, 255, 128]))
    back = read_png(tmp_path / "p.png")
    assert back.shape == (6, 8, 4) and back.dtype == np.uint8
    assert (back[..., 3] == np.array([0, 255, 128])[idx]).all()
    assert (back[2:4, 3:6, :3] == [200, 120, 40]).all()
    back.setflags(write=True)  # a writable array, as for any other PNG


def test_a_folder_where_a_file_belongs_is_named_as_such(tmp_path):
    (tmp_path / "m.obj").mkdir()
    (tmp_path / "i.png").mkdir()
    with pytest.raises(MeshSDFError, match=r"m\.obj is a folder, not a file"):
        read_mesh(tmp_path / "m.obj")
    with pytest.raises(MeshSDFError, match=r"i\.png is a folder, not a file"):
        read_png(tmp_path / "i.png")


def test_binary_obj_is_refused_in_one_line(tmp_path):
    p = tmp_path / "b.obj"
    p.write_bytes(b"v 0 0 0\n" + bytes(range(256)) * 8)
    with pytest.raises(MeshSDFError, match=r"b\.obj holds binary data, not a text OBJ mesh") as err:
        read_mesh(p)
    assert "\n" not in str(err.value)


def test_write_error_removes_the_temporary_and_names_the_file(tmp_path):
    """An OSError while writing (here: a folder where the temporary's data should go) is one line
    naming the destination, and no temporary stays."""
    p = tmp_path / "out.txt"
    with pytest.raises(MeshSDFError, match=r"cannot write .*out\.txt: "):
        with atomic_write(p) as tmp:
            tmp.unlink()
            tmp.mkdir()  # the write below then fails with EISDIR, as a full disk fails with ENOSPC
            with open(tmp, "w") as fh:
                fh.write("x")
    tmp.rmdir()  # the clean-up could not unlink a folder; nothing else is left
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_json_files_in_any_unicode_encoding(tmp_path, encoding):
    from lib.experiment.specs import read_json

    p = tmp_path / "s.json"
    p.write_bytes(json.dumps({"Description": "étoile", "CodeLength": 3}, ensure_ascii=False).encode(encoding))
    assert read_json(p) == {"Description": "étoile", "CodeLength": 3}


@pytest.mark.parametrize("text, words", [
    ('{"a": 1, "b": {"c": 2, "c": 3}}', 'key "c" appears twice'),
    ('{"a": 9223372036854775808}', "integer 9223372036854775808 is too large"),
    ('{"a": -9223372036854775809}', "integer -9223372036854775809 is too large"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_json_files_refused_in_one_line(tmp_path, text, words):
    from lib.experiment.specs import read_json

    p = tmp_path / "s.json"
    p.write_text(text)
    with pytest.raises(MeshSDFError, match=words) as err:
        read_json(p)
    assert str(err.value).startswith(str(p)) and "\n" not in str(err.value)
    p.write_text('{"a": 9223372036854775807, "b": -9223372036854775807}')  # the largest integers are fine
    assert read_json(p)["a"] == 2 ** 63 - 1
