"""User mistakes across every script: each must end with one ``script: error: ...`` line naming
the file / key / flag, a non-zero exit, no traceback and no new or changed file.

Most cases call the script's ``main(argv)`` through ``lib.cli.cli_main`` in this process
(the path ``python script.py`` takes, without paying for a new interpreter per case); a few
run as real subprocesses to prove the exit status and the absence of a traceback end to end.
"""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.cli import cli_main
from lib.errors import EXIT_USER_ERROR
from lib.io import save_png, write_obj
from tests.test_distributed import tiny_experiment

REPO = Path(__file__).resolve().parents[1]
CASES = {}


def case(script: str, *expect: str):
    """Register a mistake: ``build(tmp) -> argv`` for ``script``; ``expect``: substrings of the error
    line ("{tmp}" is replaced by the case's folder)."""
    def deco(build):
        CASES[build.__name__] = (script, build, expect)
        return build
    return deco


# --------------------------------------------------------------------------- fixtures

def edit_specs(exp: Path, **changes) -> Path:
    specs = json.loads((exp / "specs.json").read_text())
    for k, v in changes.items():
        if v is None:
            specs.pop(k, None)
        else:
            specs[k] = v
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


def npz_path(tmp: Path, k: int = 0) -> Path:
    return tmp / "data" / "toy" / "s" / f"ball{k}.npz"


def trained(tmp: Path) -> Path:
    """The tiny experiment after one epoch (checkpoint ``latest`` of CodeLength 3, dims 16 x 3)."""
    import train_deep_sdf

    exp = tiny_experiment(tmp, epochs=1, scenes=2, batch=2)
    assert train_deep_sdf.main(["-e", str(exp), "--device", "cpu", "--no-reconstruct"]) == 0
    return exp


def svr_experiment(tmp: Path, views: int = 2, checkpoint: bool = False) -> Path:
    """Two instances with samples, 16 px RGBA renders, DISN metadata and meshes; an SVR specs.json."""
    exp = tiny_experiment(tmp, epochs=1, scenes=2, batch=2)
    verts = np.array([[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    for k in range(2):
        d = tmp / "data" / "toy" / "renders" / f"ball{k}"
        for v in range(views):
            img = np.zeros((16, 16, 4), np.uint8)
            img[4:12, 4:12] = 200
            save_png(d / f"{v:02d}.png", img)
        (d / "rendering_metadata.txt").write_text("".join(f"{30 * v} 25 0 0.7 25\n" for v in range(views)))
        write_obj(tmp / "data" / "toy" / "meshes" / f"ball{k}.obj", verts, faces)
    edit_specs(exp, TestSplit=str(tmp / "split.json"), ImageSize=16, NumberOfViews=views,
               NormType="in", Depth=8, EncoderWidths=[4, 4, 4, 4], ReconstructionResolution=8,
               RefinementIterations=1, ChamferSamples=100,
               LearningRateSchedule=[{"Type": "Constant", "Value": 1e-3}])
    if checkpoint:
        import train_svr

        assert train_svr.main(["-e", str(exp), "--device", "cpu", "--epochs", "1"]) == 0
    return exp


# --------------------------------------------------------------------------- train_deep_sdf.py

@case("train_deep_sdf", "specs.json", '"CodeLength"', "missing")
def specs_missing_required_key(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp), CodeLength=None))]


@case("train_deep_sdf", "specs.json", '"NumEpochs"', "integer")
def specs_key_of_wrong_type(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp), NumEpochs="100"))]


# a misspelt specs key is not an error but a warning naming the closest known key (as DeepSDF
# ignores unknown keys): tests/test_original_compat.py::test_unknown_key_warns_naming_the_closest_known_key


@case("train_deep_sdf", "specs.json", "invalid JSON", "line 1")
def specs_not_json(tmp):
    exp = tiny_experiment(tmp)
    (exp / "specs.json").write_text('{"CodeLength": 3,,}')
    return ["-e", str(exp)]


@case("train_deep_sdf", "NetworkSpecs.latent_in", "layer 7")
def network_specs_layer_out_of_range(tmp):
    exp = tiny_experiment(tmp)
    specs = json.loads((exp / "specs.json").read_text())
    return ["-e", str(edit_specs(exp, NetworkSpecs=dict(specs["NetworkSpecs"], latent_in=[7])))]


@case("train_deep_sdf", "LearningRateSchedule", "Type")
def unknown_schedule_type(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp), LearningRateSchedule=[{"Type": "Cosine"}] * 2))]


@case("train_deep_sdf", "{tmp}/split.json", "dataset -> class -> list")
def split_file_of_wrong_shape(tmp):
    exp = tiny_experiment(tmp)
    (tmp / "split.json").write_text(json.dumps(["ball0", "ball1"]))
    return ["-e", str(exp)]


@case("train_deep_sdf", "SDF samples not found", "{tmp}/data/toy/s/ghost.npz")
def split_names_missing_instance(tmp):
    exp = tiny_experiment(tmp)
    (tmp / "split.json").write_text(json.dumps({"toy": {"s": ["ball0", "ghost"]}}))
    return ["-e", str(exp)]


@case("train_deep_sdf", "cannot read SDF samples", "{tmp}/data/toy/s/ball1.npz")
def corrupt_npz(tmp):
    exp = tiny_experiment(tmp)
    npz_path(tmp, 1).write_bytes(b"PK\x03\x04 this is not a zip archive")
    return ["-e", str(exp)]


@case("train_deep_sdf", "ball0.npz", "no 'neg' array")
def npz_without_neg(tmp):
    exp = tiny_experiment(tmp)
    np.savez(npz_path(tmp), pos=np.zeros((10, 4), np.float32), negative=np.zeros((10, 4), np.float32))
    return ["-e", str(exp)]


@case("train_deep_sdf", "ball2.npz", "'pos' has no finite rows")
def nan_only_samples(tmp):
    exp = tiny_experiment(tmp)
    nan = np.full((50, 4), np.nan, np.float32)
    np.savez(npz_path(tmp, 2), pos=nan, neg=nan)
    return ["-e", str(exp)]


@case("train_deep_sdf", "ball0.npz", "'pos' has shape (10, 3)")
def npz_rows_without_sdf(tmp):
    exp = tiny_experiment(tmp)
    np.savez(npz_path(tmp), pos=np.zeros((10, 3), np.float32), neg=np.zeros((10, 3), np.float32))
    return ["-e", str(exp)]


@case("train_deep_sdf", "unknown device 'gpu0'")
def unknown_device(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--device", "gpu0"]


@case("train_deep_sdf", "experiment folder not found", "{tmp}/no_such_exp")
def missing_experiment_folder(tmp):
    return ["-e", str(tmp / "no_such_exp")]


@case("train_deep_sdf", "{tmp}/exp/ModelParameters", "must be a folder")
def checkpoint_folder_is_a_file(tmp):
    exp = tiny_experiment(tmp)
    (exp / "ModelParameters").write_text("not a folder")
    return ["-e", str(exp)]


@case("train_deep_sdf", "cannot write to {tmp}/exp")
def read_only_experiment_folder(tmp):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only folders")
    exp = tiny_experiment(tmp)
    exp.chmod(0o555)
    return ["-e", str(exp)]


@case("train_deep_sdf", "checkpoint not found", "OptimizerParameters/5.pth", "available: latest")
def continue_from_missing_snapshot(tmp):
    return ["-e", str(trained(tmp)), "--continue", "5"]


@case("train_deep_sdf", "--continue takes 'latest' or an epoch number", "'last'")
def continue_with_bad_value(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--continue", "last"]


@case("train_deep_sdf", "OptimizerParameters/latest.pth", "does not match the network of specs.json", "CodeLength")
def checkpoint_of_another_code_length(tmp):
    return ["-e", str(edit_specs(trained(tmp), CodeLength=4)), "--continue", "latest"]


@case("train_deep_sdf", "OptimizerParameters/latest.pth", "does not match the network of specs.json")
def checkpoint_of_other_dims(tmp):
    exp = trained(tmp)
    specs = json.loads((exp / "specs.json").read_text())
    net = dict(specs["NetworkSpecs"], dims=[24, 24, 24])
    return ["-e", str(edit_specs(exp, NetworkSpecs=net)), "--continue", "latest"]


@case("train_deep_sdf", "cannot load", "OptimizerParameters/latest.pth")
def truncated_checkpoint(tmp):
    exp = trained(tmp)
    p = exp / "OptimizerParameters" / "latest.pth"
    p.write_bytes(p.read_bytes()[:200])
    return ["-e", str(exp), "--continue", "latest"]


@case("train_deep_sdf", "--epochs must be >= 1")
def zero_epochs(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--epochs", "0"]


@case("train_deep_sdf", "{tmp}/exp already holds a trained model", "ModelParameters/latest.pth",
      "--continue latest", "--overwrite", "not deleted")
def train_again_without_continue(tmp):
    return ["-e", str(trained(tmp)), "--device", "cpu", "--no-reconstruct"]


@case("train_deep_sdf", "{tmp}/bob_and_spot already holds a trained model", "--continue latest", "--overwrite")
def train_the_shipped_experiment_without_continue(tmp):
    """The README's command on (a copy of) the shipped epoch-1000 model: refused, every byte kept."""
    shutil.copytree(REPO / "experiments" / "bob_and_spot", tmp / "bob_and_spot")
    return ["-e", str(tmp / "bob_and_spot"), "--device", "cpu"]


@case("train_deep_sdf", "--overwrite starts afresh and --continue resumes")
def overwrite_and_continue_together(tmp):
    return ["-e", str(trained(tmp)), "--device", "cpu", "--overwrite", "--continue", "latest"]


def locked(tmp: Path, host: str | None = None) -> Path:
    """``trained(tmp)`` whose lock names a live process (PID 1, never ours) of this host or of ``host``."""
    import socket

    exp = trained(tmp)
    (exp / ".meshsdf.lock").write_text(json.dumps({"pid": 1, "host": host or socket.gethostname(),
                                                  "what": "train_deep_sdf.py", "since": "2026-01-01 00:00:00"}))
    return exp


@case("train_deep_sdf", "{tmp}/exp is in use by train_deep_sdf.py (PID 1 on", "wait for it to finish or stop it")
def second_training_of_one_experiment(tmp):
    return ["-e", str(locked(tmp)), "--device", "cpu", "--continue", "latest", "--no-reconstruct"]


@case("train_deep_sdf", "in use by train_deep_sdf.py (PID 1 on elsewhere.example", "if it is gone, delete",
      "{tmp}/exp/.meshsdf.lock")
def training_locked_from_another_host(tmp):
    return ["-e", str(locked(tmp, "elsewhere.example")), "--device", "cpu", "--continue", "latest"]


@case("train_deep_sdf", "{tmp}/exp/LatentCodes/latest.pth is missing", "ModelParameters/latest.pth exists",
      "copy LatentCodes/latest.pth from where the model came from")
def resume_model_without_codes(tmp):
    exp = trained(tmp)
    for kind in ("OptimizerParameters", "LatentCodes"):
        (exp / kind / "latest.pth").unlink()
    return ["-e", str(exp), "--device", "cpu", "--continue", "latest"]


@case("train_deep_sdf", "--resolution 100000 needs at least", "GiB of memory", "the largest --resolution that fits is")
def train_reconstruction_resolution_too_large(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--device", "cpu", "--resolution", "100000"]


@case("train_deep_sdf", "SamplesPerScene 1000000000 (x 2 scenes per batch) needs at least",
      "the largest SamplesPerScene that fits is")
def samples_per_scene_too_large(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp, scenes=2, batch=2), SamplesPerScene=10 ** 9)), "--device", "cpu"]


@case("train_deep_sdf", "SDF samples not found", "{tmp}/data/toy/s/bal1.npz", "did you mean 'ball1'?",
      "fix its name in the split file")
def split_with_a_misspelt_instance(tmp):
    exp = tiny_experiment(tmp, scenes=2)
    (tmp / "split.json").write_text(json.dumps({"toy": {"s": ["ball0", "bal1"]}}))
    return ["-e", str(exp)]


@case("train_deep_sdf", "DataSource {tmp}/dta does not exist", "fix DataSource in specs.json")
def data_source_that_does_not_exist(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp), DataSource=str(tmp / "dta")))]


@case("train_deep_sdf", "{tmp} has no dataset folder 'toy'", "fix DataSource in specs.json")
def data_source_one_folder_too_high(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp), DataSource=str(tmp)))]


@case("train_deep_sdf", "{tmp}/data/toy/s/ball0.npz", "a single .npy array renamed .npz", "prepare_data.py")
def npy_file_renamed_npz(tmp):
    exp = tiny_experiment(tmp)
    np.save(tmp / "a.npy", np.zeros((10, 4), np.float32))
    (tmp / "a.npy").replace(npz_path(tmp))
    return ["-e", str(exp)]


@case("train_deep_sdf", "{tmp}/data/toy/s/ball0.npz", "not an .npz archive")
def npz_of_random_bytes(tmp):
    exp = tiny_experiment(tmp)
    npz_path(tmp).write_bytes(np.random.default_rng(0).bytes(300))
    return ["-e", str(exp)]


@case("train_deep_sdf", "belongs to a single-view reconstruction experiment", "run train_svr.py")
def deep_sdf_training_of_an_svr_experiment(tmp):
    return ["-e", str(svr_experiment(tmp)), "--device", "cpu"]


# --------------------------------------------------------------------------- prepare_data.py

@case("prepare_data", "{tmp}/notes.obj")
def mesh_file_that_is_not_a_mesh(tmp):
    (tmp / "notes.obj").write_text("these are my notes, not vertices\n")
    return ["--mesh", str(tmp / "notes.obj"), "--dataset", "mine", "--out", str(tmp / "out"), "--samples", "100"]


@case("prepare_data", "--dataset NAME is required")
def mesh_without_dataset_name(tmp):
    write_obj(tmp / "tet.obj", np.eye(4, 3, dtype=np.float32), np.array([[0, 1, 2], [0, 2, 3]]))
    return ["--mesh", str(tmp / "tet.obj"), "--out", str(tmp / "out")]


@case("prepare_data", "{tmp}/absent.ply")
def missing_mesh_file(tmp):
    return ["--mesh", str(tmp / "absent.ply"), "--dataset", "mine", "--out", str(tmp / "out")]


@case("prepare_data", "dataset name 'my data'")
def dataset_name_with_space(tmp):
    return ["--builtin", "bob_and_spot", "--dataset", "my data", "--out", str(tmp / "out")]


@case("prepare_data", "--samples must be at least 10")
def too_few_samples(tmp):
    return ["--builtin", "bob_and_spot", "--samples", "3", "--out", str(tmp / "out")]


@case("prepare_data", "--resolution 100000 needs at least", "the largest --resolution that fits is")
def builtin_meshing_resolution_too_large(tmp):
    return ["--builtin", "bob_and_spot", "--resolution", "100000", "--out", str(tmp / "out")]


@case("prepare_data", "--samples 100000000000 needs at least")
def too_many_samples(tmp):
    return ["--builtin", "bob_and_spot", "--samples", str(10 ** 11), "--out", str(tmp / "out")]


@case("prepare_data", "--image-size 100000 needs at least")
def render_size_too_large(tmp):
    return ["--builtin", "toy_cars", "--count", "2", "--image-size", "100000", "--out", str(tmp / "out")]


# --------------------------------------------------------------------------- demo_optimizer.py

@case("demo_optimizer", "checkpoint not found", "{tmp}/exp/ModelParameters/latest.pth", "train it first")
def demo_without_checkpoint(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--target", "ball0", "--init", "ball1", "--device", "cpu"]


@case("demo_optimizer", "--target 'bob'", "valid names: ball0, ball1")
def demo_target_not_in_split(tmp):
    return ["-e", str(tiny_experiment(tmp, scenes=2)), "--device", "cpu"]


@case("demo_optimizer", "--iterations must be >= 1")
def demo_zero_iterations(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--iterations", "0"]


@case("demo_optimizer", "ModelParameters/latest.pth", "does not match the network of specs.json")
def demo_with_checkpoint_of_other_dims(tmp):
    exp = trained(tmp)
    specs = json.loads((exp / "specs.json").read_text())
    net = dict(specs["NetworkSpecs"], dims=[24, 24, 24])
    return ["-e", str(edit_specs(exp, NetworkSpecs=net)), "--target", "ball0", "--init", "ball1", "--device", "cpu"]


@case("demo_optimizer", "{tmp}/exp/LatentCodes/latest.pth is missing", "ModelParameters/latest.pth exists")
def demo_model_without_codes(tmp):
    exp = trained(tmp)
    (exp / "LatentCodes" / "latest.pth").unlink()
    return ["-e", str(exp), "--target", "ball0", "--init", "ball1", "--device", "cpu"]


def finished_demo_output(tmp: Path) -> Path:
    """A folder as an earlier demo run left it (with staged_dir's mark)."""
    out = tmp / "Optimizations"
    out.mkdir()
    (out / ".meshsdf-output").write_text("")
    for name in ("final.ply", "movie.gif", "log.json"):
        (out / name).write_text(f"an earlier run's {name}")
    return out


@case("demo_optimizer", "--target 'bobb'", "valid names: bob, spot")
def demo_rerun_that_fails_into_a_finished_output(tmp):
    """Nothing of the new run mixes with (or replaces) the earlier output."""
    exp = tmp / "bob_and_spot"
    shutil.copytree(REPO / "experiments" / "bob_and_spot", exp)
    return ["-e", str(exp), "--out", str(finished_demo_output(tmp)), "--target", "bobb", "--device", "cpu"]


@case("demo_optimizer", "output folder {tmp}/Optimizations/final.ply is a file", "give --out a folder")
def demo_out_at_an_existing_file(tmp):
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(finished_demo_output(tmp) / "final.ply")]


@case("demo_optimizer", "output folder {tmp}/Optimizations/final.ply/run2 is below {tmp}/Optimizations/final.ply, "
      "which is a file")
def demo_out_below_an_existing_file(tmp):
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out",
            str(finished_demo_output(tmp) / "final.ply" / "run2")]


@case("demo_optimizer", "output folder {tmp} already holds files that no earlier run of this command wrote",
      "give --out a new or empty folder")
def demo_out_at_a_folder_of_the_user(tmp):
    (tmp / "thesis.tex").write_text("months of work")
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(tmp), "--device", "cpu"]


@case("demo_optimizer", "--resolution 100000 needs at least", "the largest --resolution that fits is")
def demo_resolution_too_large(tmp):
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(tmp / "o"), "--resolution", "100000",
            "--device", "cpu"]


@case("demo_optimizer", "--image-size 100000 needs at least", "the largest --image-size that fits is")
def demo_image_size_too_large(tmp):
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(tmp / "o"), "--image-size", "100000",
            "--device", "cpu"]


@case("demo_optimizer", "ModelParameters/latest.pth is epoch 1, LatentCodes/latest.pth is epoch 7",
      "they come from different saves")
def demo_model_and_codes_of_different_epochs(tmp):
    import torch

    exp = trained(tmp)
    p = exp / "LatentCodes" / "latest.pth"
    codes = torch.load(p, weights_only=True)
    torch.save(dict(codes, epoch=7), p)
    return ["-e", str(exp), "--target", "ball0", "--init", "ball1", "--device", "cpu"]


# --------------------------------------------------------------------------- SVR scripts

@case("train_svr", "cannot read image", "{tmp}/data/toy/renders/ball1/01.png")
def corrupt_png(tmp):
    exp = svr_experiment(tmp)
    (tmp / "data" / "toy" / "renders" / "ball1" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@case("train_svr", "{tmp}/data/toy/renders/ball0/rendering_metadata.txt, line 2", "expected 5 numbers")
def malformed_metadata_line(tmp):
    exp = svr_experiment(tmp)
    (tmp / "data" / "toy" / "renders" / "ball0" / "rendering_metadata.txt").write_text("0 25 0 0.7 25\n30 25\n")
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@case("train_svr", "render not found", "{tmp}/data/toy/renders/ball0/02.png", "NumberOfViews")
def fewer_renders_than_views(tmp):
    exp = edit_specs(svr_experiment(tmp), NumberOfViews=3)
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@case("train_svr", '"NormType"', "must be one of")
def svr_encoder_of_unknown_norm(tmp):
    exp = edit_specs(svr_experiment(tmp), NormType="group")
    return ["-e", str(exp), "--device", "cpu"]


@case("train_svr", "{tmp}/exp/ModelParameters", "must be a folder")
def svr_checkpoint_folder_is_a_file(tmp):
    exp = svr_experiment(tmp)
    (exp / "ModelParameters").write_text("not a folder")
    return ["-e", str(exp), "--device", "cpu"]


@case("train_svr", "unknown device 'gpu0'")
def svr_unknown_device(tmp):
    return ["-e", str(svr_experiment(tmp)), "--device", "gpu0"]


@case("train_svr", "checkpoint not found", "OptimizerParameters/5.pth", "available: latest")
def svr_continue_from_missing_snapshot(tmp):
    return ["-e", str(svr_experiment(tmp, checkpoint=True)), "--device", "cpu", "--continue", "5"]


@case("train_svr", "renders not found", "{tmp}/data/toy/renders/ball0", "render the instances", "RendersPath")
def svr_dataset_without_renders(tmp):
    exp = svr_experiment(tmp)
    shutil.rmtree(tmp / "data" / "toy" / "renders")
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@case("train_svr", "renders not found", "{tmp}/data/toy/renders/ball1", "lacks this instance of the split")
def svr_render_folder_renamed(tmp):
    exp = svr_experiment(tmp)
    (tmp / "data" / "toy" / "renders" / "ball1").rename(tmp / "data" / "toy" / "renders" / "ball1_old")
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@case("train_svr", "does not match the network of specs.json", "other encoder settings")
def svr_checkpoint_of_another_encoder(tmp):
    exp = svr_experiment(tmp, checkpoint=True)
    return ["-e", str(edit_specs(exp, EncoderWidths=[8, 8, 8, 8])), "--device",
            "cpu", "--continue", "latest"]


@case("train_svr", "{tmp}/exp already holds a trained model", "--continue latest", "--overwrite")
def svr_train_again_without_continue(tmp):
    return ["-e", str(svr_experiment(tmp, checkpoint=True)), "--device", "cpu", "--epochs", "1"]


@case("train_svr", "ImageSize 100000 needs at least", "the largest ImageSize that fits is")
def svr_image_size_too_large(tmp):
    return ["-e", str(edit_specs(svr_experiment(tmp), ImageSize=100000)), "--device", "cpu", "--epochs", "1"]


@case("train_svr", "SamplesPerScene 1000000000 (x 2 scenes per batch) needs at least")
def svr_samples_per_scene_too_large(tmp):
    return ["-e", str(edit_specs(svr_experiment(tmp), SamplesPerScene=10 ** 9)), "--device", "cpu", "--epochs", "1"]


@case("reconstruct_svr", "--resolution 100000 needs at least", "the largest --resolution that fits is")
def reconstruct_resolution_too_large(tmp):
    return ["-e", str(svr_experiment(tmp)), "--resolution", "100000", "--device", "cpu"]


@case("reconstruct_svr", "ImageSize 100000 needs at least", "the largest ImageSize that fits is")
def reconstruct_image_size_too_large(tmp):
    return ["-e", str(edit_specs(svr_experiment(tmp), ImageSize=100000)), "--device", "cpu"]


@case("metrics_svr", "ball0 and {tmp}/exp/Reconstructions/latest/ball0_backup hold the same reconstruction",
      "move the copy out of {tmp}/exp/Reconstructions/latest")
def metrics_with_a_copied_instance_folder(tmp):
    from lib.svr.reconstruct import LOG_FILES, META_FILE

    exp = svr_experiment(tmp)
    for name in ("ball0", "ball0_backup"):  # the user's backup copy of a finished instance
        d = exp / "Reconstructions" / "latest" / name
        d.mkdir(parents=True)
        for fname in LOG_FILES.values():
            np.save(d / fname, np.array([1.0, 0.5]))
        (d / META_FILE).write_text(json.dumps({"instance": "ball0", "view": 1}))
    return ["-e", str(exp)]


@case("reconstruct_svr", "view 5 does not exist", "NumberOfViews")
def reconstruct_view_out_of_range(tmp):
    return ["-e", str(svr_experiment(tmp)), "--views", "5", "--device", "cpu"]


@case("reconstruct_svr", "instance 'ghost' is not in the TestSplit")
def reconstruct_unknown_instance(tmp):
    return ["-e", str(svr_experiment(tmp)), "--instances", "ghost", "--device", "cpu"]


@case("reconstruct_svr", "checkpoint not found", "ModelParameters/encoder_latest.pth",
      "train it first with train_svr.py")
def reconstruct_without_network(tmp):
    return ["-e", str(svr_experiment(tmp)), "--device", "cpu"]


@case("metrics_svr", "no reconstructions in {tmp}/exp/Reconstructions", "reconstruct_svr.py")
def metrics_before_reconstructing(tmp):
    return ["-e", str(svr_experiment(tmp))]


# --------------------------------------------------------------------------- issue 26: data loss
# Each refusal leaves every file byte for byte (the table's snapshot check): no newer `latest`
# rewritten, nothing moved into Backups/ before every input is valid, no dataset replaced.

def trained_to_5(tmp: Path) -> Path:
    """The tiny experiment trained to epoch 5 with snapshots 2 and 4 (latest = 5)."""
    import train_deep_sdf

    exp = tiny_experiment(tmp, epochs=5, scenes=2, batch=2, snapshots=(2, 4))
    assert train_deep_sdf.main(["-e", str(exp), "--device", "cpu", "--no-reconstruct"]) == 0
    return exp


@case("train_deep_sdf", "--continue 2 in {tmp}/exp would overwrite the newer epoch 5", "nothing was changed",
      "--continue latest", "copy specs.json, Logs.pth and ModelParameters/2.pth, OptimizerParameters/2.pth, "
      "LatentCodes/2.pth into a new experiment folder and run --continue 2 there")
def continue_from_an_older_snapshot_with_fewer_epochs(tmp):
    return ["-e", str(trained_to_5(tmp)), "-c", "2", "--epochs", "3", "--device", "cpu", "--no-reconstruct"]


@case("train_deep_sdf", "--continue 4 in {tmp}/exp would overwrite the newer epoch 5", "--continue latest")
def continue_from_an_older_snapshot(tmp):
    return ["-e", str(trained_to_5(tmp)), "-c", "4", "--device", "cpu", "--no-reconstruct"]


@case("train_svr", "--continue 3 in {tmp}/exp would overwrite the newer epoch 5", "--continue latest",
      "copy specs.json, Logs.pth and ModelParameters/encoder_3.pth, ModelParameters/decoder_3.pth, "
      "OptimizerParameters/3.pth into a new experiment folder")
def svr_continue_from_an_older_snapshot(tmp):
    import train_svr

    exp = edit_specs(svr_experiment(tmp), NumEpochs=5, AdditionalSnapshots=[3])
    assert train_svr.main(["-e", str(exp), "--device", "cpu"]) == 0
    return ["-e", str(exp), "-c", "3", "--epochs", "4", "--device", "cpu"]


@case("train_deep_sdf", "nothing to train", "{tmp}/exp is at epoch 1 and --epochs 1 ends at or before it",
      "pass --epochs 2 or more")
def continue_with_epochs_at_the_current_epoch(tmp):
    return ["-e", str(trained(tmp)), "-c", "latest", "--epochs", "1", "--device", "cpu"]


@case("train_deep_sdf", "nothing to train", "{tmp}/exp is at epoch 5 and --epochs 3 ends at or before it",
      "pass --epochs 6 or more")
def continue_with_epochs_below_the_current_epoch(tmp):
    return ["-e", str(trained_to_5(tmp)), "-c", "latest", "--epochs", "3", "--device", "cpu"]


@case("train_deep_sdf", "checkpoint not found", "OptimizerParameters/3.pth", "available: latest, 2, 4")
def continue_from_a_snapshot_between_two(tmp):
    return ["-e", str(trained_to_5(tmp)), "-c", "3", "--device", "cpu"]


@case("train_svr", "nothing to train", "{tmp}/exp is at epoch 1 and --epochs 1 ends at or before it",
      "pass --epochs 2 or more")
def svr_continue_with_epochs_at_the_current_epoch(tmp):
    return ["-e", str(svr_experiment(tmp, checkpoint=True)), "-c", "latest", "--epochs", "1", "--device", "cpu"]


@case("train_deep_sdf", "DataSource {tmp}/dta does not exist", "fix DataSource in specs.json")
def overwrite_with_a_wrong_data_source(tmp):
    """--overwrite checks every input before it moves the old model aside: still in place, no Backups/."""
    return ["-e", str(edit_specs(trained(tmp), DataSource=str(tmp / "dta"))), "--overwrite", "--device", "cpu"]


@case("train_deep_sdf", "SDF samples not found", "{tmp}/data/toy/s/ghost.npz")
def overwrite_with_a_sample_missing(tmp):
    exp = trained(tmp)
    (tmp / "split.json").write_text(json.dumps({"toy": {"s": ["ball0", "ghost"]}}))
    return ["-e", str(exp), "--overwrite", "--device", "cpu"]


@case("train_deep_sdf", "SamplesPerScene 1000000000 (x 2 scenes per batch) needs at least")
def overwrite_with_samples_per_scene_too_large(tmp):
    return ["-e", str(edit_specs(trained(tmp), SamplesPerScene=10 ** 9)), "--overwrite", "--device", "cpu"]


@case("train_svr", "renders not found", "{tmp}/data/toy/renders/ball0")
def svr_overwrite_without_renders(tmp):
    exp = svr_experiment(tmp, checkpoint=True)
    shutil.rmtree(tmp / "data" / "toy" / "renders")
    return ["-e", str(exp), "--overwrite", "--device", "cpu", "--epochs", "1"]


@case("train_svr", "checkpoint not found", "{tmp}/nowhere/ModelParameters/latest.pth")
def svr_overwrite_with_a_missing_decoder_init(tmp):
    exp = svr_experiment(tmp, checkpoint=True)
    return ["-e", str(edit_specs(exp, DecoderInit=str(tmp / "nowhere"))), "--overwrite", "--device", "cpu"]


@case("train_svr", "{tmp}/exp holds a DeepSDF auto-decoder model", "not a single-view reconstruction one",
      "put the SVR specs.json into a new folder", "DecoderInit")
def svr_training_of_a_deep_sdf_experiment(tmp):
    """The DeepSDF model must not be moved aside: the message never suggests --overwrite (test_safety checks)."""
    exp = trained(tmp)
    svr = svr_experiment(tmp / "svr")
    shutil.copy(svr / "specs.json", exp / "specs.json")
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@case("demo_optimizer", "checkpoint not found", "{tmp}/exp/ModelParameters/latest.pth",
      "--overwrite moved the previous model into {tmp}/exp/Backups/", "move its folders back into {tmp}/exp")
def demo_after_an_overwrite_that_stopped(tmp):
    from lib import experiment

    exp = trained(tmp)
    experiment.move_aside(exp)  # what --overwrite did before a run that was stopped before its first save
    return ["-e", str(exp), "--target", "ball0", "--init", "ball1", "--device", "cpu"]


@case("demo_optimizer", "--checkpoint epoch must be >= 1, got -1")
def demo_checkpoint_minus_one(tmp):
    return ["-e", str(trained(tmp)), "--checkpoint", "-1", "--device", "cpu"]


def tetrahedron(tmp: Path, name: str) -> str:
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    write_obj(tmp / f"{name}.obj", verts, np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]))
    return str(tmp / f"{name}.obj")


@case("prepare_data", "{tmp}/data/mine already holds a dataset (split.json, samples of a, b)", "nothing was changed",
      "give a new --dataset name, or move {tmp}/data/mine aside")
def prepare_into_an_existing_dataset(tmp):
    import prepare_data

    args = ["--dataset", "mine", "--out", str(tmp / "data"), "--samples", "200"]
    assert prepare_data.main(["--mesh", tetrahedron(tmp, "a"), tetrahedron(tmp, "b"), *args]) == 0
    return ["--mesh", tetrahedron(tmp, "c"), *args]


@case("prepare_data", "dataset name '..'", "rename it")
def prepare_into_the_parent_of_the_data_root(tmp):
    return ["--mesh", tetrahedron(tmp, "a"), "--dataset", "..", "--out", str(tmp / "data"), "--samples", "200"]


# --------------------------------------------------------------------------- issue 26: tracebacks and messages

def png_palette_with_transparency(path: Path, size: int = 16) -> None:
    """An RGBA-looking render stored as a palette PNG whose tRNS chunk makes index 0 transparent."""
    from PIL import Image

    idx = np.zeros((size, size), np.uint8)
    idx[4:12, 4:12] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 200, 120, 40] + [0] * 762)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, transparency=0)


@case("train_deep_sdf", "{tmp}/exp/ModelParameters/latest.pth is a folder where a checkpoint file is written")
def checkpoint_file_path_is_a_folder(tmp):
    exp = tiny_experiment(tmp)
    (exp / "ModelParameters" / "latest.pth").mkdir(parents=True)
    return ["-e", str(exp), "--device", "cpu", "--no-reconstruct"]


@case("reconstruct_svr", "output folder {tmp}/notes.txt cannot be made: {tmp}/notes.txt is a file")
def reconstruct_out_is_a_file(tmp):
    exp = svr_experiment(tmp)
    (tmp / "notes.txt").write_text("my notes")
    return ["-e", str(exp), "--out", str(tmp / "notes.txt"), "--device", "cpu"]


@case("train_deep_sdf", "NetworkSpecs.dims 200000 (widest layer) needs at least",
      "the largest NetworkSpecs.dims that fits is")
def network_dims_too_wide(tmp):
    exp = tiny_experiment(tmp)
    specs = json.loads((exp / "specs.json").read_text())
    return ["-e", str(edit_specs(exp, NetworkSpecs=dict(specs["NetworkSpecs"], dims=[200000] * 4))), "--device", "cpu"]


@case("train_deep_sdf", "CodeLength 2000000000", "needs at least", "the largest CodeLength that fits is")
def code_length_too_large(tmp):
    return ["-e", str(edit_specs(tiny_experiment(tmp), CodeLength=2 * 10 ** 9)), "--device", "cpu"]


@case("check_gradients", "--resolution 100000 needs at least", "the largest --resolution that fits is")
def check_gradients_resolution_too_large(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--resolution", "100000", "--device", "cpu"]


@case("reconstruct_svr", "--chamfer-samples 2000000000 needs at least", "the largest --chamfer-samples that fits is")
def chamfer_samples_too_many(tmp):
    return ["-e", str(svr_experiment(tmp)), "--chamfer-samples", str(2 * 10 ** 9), "--device", "cpu"]


@case("train_deep_sdf", '"NetworkSpecs.dropout_prob"', "<= 0.99998", "0.9999999")
def dropout_prob_just_below_one(tmp):
    exp = tiny_experiment(tmp)
    specs = json.loads((exp / "specs.json").read_text())
    return ["-e", str(edit_specs(exp, NetworkSpecs=dict(specs["NetworkSpecs"], dropout_prob=0.9999999))),
            "--device", "cpu", "--no-reconstruct"]


@case("demo_optimizer", "--fps must be a finite number >= 0.002 and <= 100, got 1e-300")
def demo_fps_tiny(tmp):
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(tmp / "o"), "--fps", "1e-300",
            "--device", "cpu"]


@case("prepare_data", "--seed must be between 0 and 9223372036854775807, got -5")
def prepare_negative_seed(tmp):
    return ["--builtin", "bob_and_spot", "--seed", "-5", "--samples", "100", "--resolution", "32",
            "--out", str(tmp / "out")]


@case("train_deep_sdf", "--seed must be between 0 and 9223372036854775807, got 18446744073709551617")
def train_seed_above_two_to_the_63(tmp):
    return ["-e", str(tiny_experiment(tmp)), "--seed", str(2 ** 64 + 1), "--device", "cpu"]


@case("train_deep_sdf", "{tmp}/exp/specs.json: nested too deeply")
def specs_nested_fifty_thousand_deep(tmp):
    exp = tiny_experiment(tmp)
    (exp / "specs.json").write_text('{"Description": ' + "[" * 50000 + "]" * 50000 + "}")
    return ["-e", str(exp)]


@case("train_deep_sdf", "{tmp}/exp/specs.json: integer 999999999999...(5000 digits) is too large")
def specs_integer_of_5000_digits(tmp):
    exp = tiny_experiment(tmp)
    text = (exp / "specs.json").read_text()
    (exp / "specs.json").write_text(text.replace('"NumEpochs": 3', '"NumEpochs": ' + "9" * 5000))
    return ["-e", str(exp)]


@case("prepare_data", "mesh {tmp}/sheet.obj encloses no volume", "give a closed surface")
def mesh_without_inside(tmp):
    verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    write_obj(tmp / "sheet.obj", verts, np.array([[0, 1, 2], [0, 2, 3]]))
    return ["--mesh", str(tmp / "sheet.obj"), "--dataset", "mine", "--out", str(tmp / "out"), "--samples", "100"]


@case("demo_optimizer", "--lr must be a finite number > 0, got inf")
def demo_infinite_learning_rate(tmp):
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(tmp / "o"), "--lr", "inf"]


@case("reconstruct_svr", "--sigma must be a finite number > 0, got inf")
def reconstruct_infinite_sigma(tmp):
    return ["-e", str(svr_experiment(tmp)), "--sigma", "inf", "--device", "cpu"]


@case("reconstruct_svr", "--lr must be a finite number > 0, got inf")
def reconstruct_infinite_learning_rate(tmp):
    return ["-e", str(svr_experiment(tmp)), "--lr", "inf", "--device", "cpu"]


@case("reconstruct_svr", "--regularize must be a finite number >= 0, got inf")
def reconstruct_infinite_regularization(tmp):
    return ["-e", str(svr_experiment(tmp)), "--regularize", "inf", "--device", "cpu"]


@case("demo_optimizer", "{tmp}/exp/ModelParameters/latest.pth holds NaN or infinite values", "diverged")
def demo_with_nan_checkpoint(tmp):
    import torch

    exp = trained(tmp)
    p = exp / "ModelParameters" / "latest.pth"
    obj = torch.load(p, weights_only=True)
    obj["model_state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                               for k, v in obj["model_state_dict"].items()}
    torch.save(obj, p)
    return ["-e", str(exp), "--target", "ball0", "--init", "ball1", "--device", "cpu", "--out", str(tmp / "o")]


@case("train_deep_sdf", "{tmp}/exp/specs.json", 'key "CodeLength" appears twice')
def specs_with_a_duplicate_key(tmp):
    exp = tiny_experiment(tmp)
    text = (exp / "specs.json").read_text()
    (exp / "specs.json").write_text(text.replace('"CodeLength": 3', '"CodeLength": 3, "CodeLength": 8'))
    return ["-e", str(exp)]


@case("train_deep_sdf", "{tmp}/exp/specs.json is not UTF-8 text", "save it as UTF-8")
def specs_in_latin1(tmp):
    exp = tiny_experiment(tmp)
    specs = json.loads((exp / "specs.json").read_text())
    specs["Description"] = "forme étoilée"
    (exp / "specs.json").write_bytes(json.dumps(specs, ensure_ascii=False).encode("latin-1"))
    return ["-e", str(exp)]


@case("train_deep_sdf", "split file {tmp}/split.json is a folder, not a file")
def split_file_is_a_folder(tmp):
    exp = tiny_experiment(tmp)
    (tmp / "split.json").unlink()
    (tmp / "split.json").mkdir()
    return ["-e", str(exp)]


@case("prepare_data", "mesh file {tmp}/m.obj is a folder, not a file")
def mesh_path_is_a_folder(tmp):
    (tmp / "m.obj").mkdir()
    return ["--mesh", str(tmp / "m.obj"), "--dataset", "mine", "--out", str(tmp / "out"), "--samples", "100"]


@case("demo_optimizer", "{tmp}/exp/ModelParameters/latest.pth is a folder, not a checkpoint file")
def demo_checkpoint_is_a_folder(tmp):
    exp = tiny_experiment(tmp)
    (exp / "ModelParameters" / "latest.pth").mkdir(parents=True)
    return ["-e", str(exp), "--target", "ball0", "--init", "ball1", "--device", "cpu", "--out", str(tmp / "o")]


@case("prepare_data", "{tmp}/binary.obj holds binary data, not a text OBJ mesh")
def binary_obj(tmp):
    (tmp / "binary.obj").write_bytes(bytes(range(256)) * 40)
    return ["--mesh", str(tmp / "binary.obj"), "--dataset", "mine", "--out", str(tmp / "out"), "--samples", "100"]


# Inputs that used to fail but are now read as meant: ``build(tmp) -> argv`` must exit 0 and
# ``check(tmp)`` hold afterwards.
OK_CASES = {}


def ok_case(script: str, check):
    def deco(build):
        OK_CASES[build.__name__] = (script, build, check)
        return build
    return deco


def _trained_epoch_1(tmp):
    import torch

    return torch.load(tmp / "exp" / "ModelParameters" / "latest.pth", weights_only=True)["epoch"] == 1


@ok_case("train_deep_sdf", _trained_epoch_1)
def specs_in_utf16(tmp):
    exp = tiny_experiment(tmp, epochs=1, scenes=2, batch=2)
    (exp / "specs.json").write_bytes((exp / "specs.json").read_text().encode("utf-16"))
    return ["-e", str(exp), "--device", "cpu", "--no-reconstruct"]


@ok_case("train_svr", lambda tmp: (tmp / "exp" / "ModelParameters" / "encoder_latest.pth").is_file())
def svr_palette_renders_with_transparency(tmp):
    exp = svr_experiment(tmp)
    for k in range(2):
        for v in range(2):
            png_palette_with_transparency(tmp / "data" / "toy" / "renders" / f"ball{k}" / f"{v:02d}.png")
    return ["-e", str(exp), "--device", "cpu", "--epochs", "1"]


@pytest.mark.parametrize("name", sorted(OK_CASES))
def test_input_once_refused_now_read_as_meant(name, tmp_path, capsys, monkeypatch):
    script, build, check = OK_CASES[name]
    monkeypatch.setenv("MESHSDF_QUIET", "1")
    argv = build(tmp_path)
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        cli_main(lambda: module.main(argv), prog=f"{script}.py")
    err = capsys.readouterr().err
    assert stop.value.code == 0, err
    assert "Traceback" not in err and "error" not in err
    assert check(tmp_path)


# Mistakes of the machine, not of the arguments: a full disk (a small tmpfs) and a read-only
# experiment (a read-only bind mount), each made in a private mount namespace (unshare -m).
# ``build(tmp) -> (argv, mounts)``: mounts are shell commands run in the namespace first.
NS_CASES = {}


def ns_case(script: str, *expect: str):
    def deco(build):
        NS_CASES[build.__name__] = (script, build, expect)
        return build
    return deco


def _full_disk(tmp: Path, src: Path, size_kib: int) -> tuple[Path, list[str]]:
    """``tmp/full``: a tmpfs of ``size_kib`` holding a copy of ``src`` (or nothing when None)."""
    full = tmp / "full"
    full.mkdir()
    cmds = [f"mount -t tmpfs -o size={size_kib}k tmpfs {full}"]
    if src is not None:
        cmds.append(f"cp -r {src} {full}/")
    return full, cmds


@ns_case("train_deep_sdf", "cannot write {tmp}/full/exp/", "no space left on the device", "nothing was half-written")
def train_on_a_full_disk(tmp):
    exp = tiny_experiment(tmp, epochs=1, scenes=2, batch=2, dims=(64, 64, 64))
    full, cmds = _full_disk(tmp, exp, 16)
    return ["-e", str(full / "exp"), "--device", "cpu", "--no-reconstruct"], cmds


@ns_case("demo_optimizer", "cannot write {tmp}/full/", "no space left on the device")
def demo_on_a_full_disk(tmp):
    full, cmds = _full_disk(tmp, None, 8)
    return ["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", str(full / "o"), "--iterations", "2",
            "--image-size", "128", "--resolution", "16", "--device", "cpu"], cmds


@ns_case("reconstruct_svr", "cannot write to {tmp}/exp: Read-only file system", "give --out a writable folder")
def reconstruct_in_a_read_only_experiment(tmp):
    exp = svr_experiment(tmp)
    return ["-e", str(exp), "--device", "cpu"], [f"mount --bind {exp} {exp}", f"mount -o remount,bind,ro {exp}"]


_NS_DRIVER = r"""
import hashlib, json, subprocess, sys
from pathlib import Path
root, cmds, argv = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for c in cmds:
    subprocess.run(c, shell=True, check=True)
def snap():
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in root.rglob("*")}
before = snap()
proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "err": proc.stderr, "out": proc.stdout, "before": before, "after": snap()}))
"""


def _can_unshare() -> bool:
    import shutil as sh

    if sys.platform != "linux" or not sh.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"] if os.geteuid() == 0 else ["unshare", "-rm", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NS_CASES))
def test_machine_mistake_gives_one_line_and_nothing_half_written(name, tmp_path):
    if not _can_unshare():
        pytest.skip("needs Linux mount namespaces (unshare -m)")
    script, build, expect = NS_CASES[name]
    argv, mounts = build(tmp_path)
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    proc = subprocess.run([*unshare, sys.executable, "-c", _NS_DRIVER, str(tmp_path), json.dumps(mounts),
                           json.dumps([str(REPO / f"{script}.py"), *argv])], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    check_error(run["err"], run["rc"], expect, tmp_path, script)
    new = {p: h for p, h in run["after"].items() if p not in run["before"]}
    assert not [p for p in new if ".tmp" in Path(p).name], "a temporary file was left"
    changed = [p for p, h in run["before"].items() if run["after"].get(p, "gone") != h and h is not None]
    assert not changed, changed


@pytest.mark.slow
def test_sigterm_stops_prepare_data_workers_at_once(tmp_path):
    """SIGTERM to ``prepare_data.py --workers 2``: both workers are gone soon after the parent, and no
    temporary file is left (each worker unwinds through atomic_write)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), "--builtin", "toy_cars", "--count", "4",
                             "--views", "0", "--samples", "3000000", "--workers", "2", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1"))

    def children():
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid and "spawn_main" in (stat.parent / "cmdline").read_text(errors="ignore"):
                kids.append(int(stat.parent.name))
        return kids

    import time

    workers = []
    for _ in range(600):  # until both workers are sampling
        workers = children()
        if len(workers) == 2 and (out / "toy_cars" / "samples").is_dir():
            break
        time.sleep(0.1)
    assert len(workers) == 2, "the workers did not start"
    time.sleep(2.0)  # well into the sampling of the first meshes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == [err.strip()] and "stopped by SIGTERM" in err and "Traceback" not in err
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} outlived their parent"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / "toy_cars" / "split.json").exists()


# --------------------------------------------------------------------------- the checks

def snapshot(root: Path) -> dict:
    """Every path under ``root``: the sha256 of each file's bytes (folders: None).  A folder's own
    mtime may change (a lock file comes and goes); its entries may not."""
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in root.rglob("*")}


def check_error(line_or_err: str, rc: int, expect, tmp: Path, script: str):
    assert rc != 0 and rc == EXIT_USER_ERROR, f"exit status {rc}"
    assert "Traceback" not in line_or_err
    lines = [ln for ln in line_or_err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{script}.py: error: "), lines[0]
    for e in expect:
        assert e.replace("{tmp}", str(tmp)) in lines[0], (e, lines[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_mistake_gives_one_line_and_no_output(name, tmp_path, capsys, monkeypatch):
    script, build, expect = CASES[name]
    monkeypatch.setenv("MESHSDF_QUIET", "1")
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        cli_main(lambda: module.main(argv), prog=f"{script}.py")
    err = capsys.readouterr().err
    check_error(err, stop.value.code, expect, tmp_path, script)
    assert snapshot(tmp_path) == before, "files were written or changed"


SUBPROCESS_CASES = ("checkpoint_of_another_code_length", "mesh_file_that_is_not_a_mesh", "corrupt_png")


@pytest.mark.slow
def test_scripts_exit_2_without_traceback(tmp_path):
    """The same mistakes through ``python script.py``: run side by side (interpreter start-up dominates)."""
    runs = []
    for name in SUBPROCESS_CASES:
        script, build, expect = CASES[name]
        tmp = tmp_path / name
        tmp.mkdir()
        argv = build(tmp)
        before = snapshot(tmp)
        proc = subprocess.Popen([sys.executable, str(REPO / f"{script}.py"), *argv], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1"))
        runs.append((proc, script, expect, tmp, before))
    for proc, script, expect, tmp, before in runs:
        out, err = proc.communicate(timeout=180)
        check_error(err, proc.returncode, expect, tmp, script)
        assert out == ""
        assert snapshot(tmp) == before


def test_there_are_at_least_twenty_distinct_mistakes_across_all_scripts():
    scripts = {script for script, _, _ in CASES.values()}
    assert len(CASES) >= 20
    assert scripts == {"train_deep_sdf", "prepare_data", "demo_optimizer", "train_svr", "reconstruct_svr",
                       "metrics_svr", "check_gradients"}
