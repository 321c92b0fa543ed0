"""No command destroys a trained model: released models resume, --overwrite moves aside, one
writer per experiment, and logs that suit a batch job.  In-process (fast); the subprocess races
and kills are in test_faults.py."""
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_deep_sdf
from lib import experiment
from lib.cli import cli_main
from lib.errors import MeshSDFError
from lib.log import PlainProgress, progress
from lib.datasets.sampling import split_by_sign, write_sdf_samples
from tests.test_distributed import tiny_experiment

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "bob_and_spot"
SHIPPED_EPOCH = torch.load(SHIPPED / "ModelParameters" / "latest.pth", weights_only=True)["epoch"]


def tree_sha256(root: Path, mark: bool = False) -> dict:
    """sha256 of every file under ``root`` by relative path (staged_dir's mark left out unless ``mark``)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and (mark or p.name != ".meshsdf-output")}


def shipped_copy(tmp: Path, samples: int = 256) -> Path:
    """experiments/bob_and_spot copied (model and codes of epoch SHIPPED_EPOCH, no optimizer state, as
    every DeepSDF / MeshSDF release), with stand-in samples for bob and spot and few samples per scene."""
    exp = tmp / "bob_and_spot"
    # only what the repository ships: the README's quick start leaves e.g. Optimizations/ from the demo
    shutil.copytree(SHIPPED, exp, ignore=lambda d, names: [n for n in names if Path(d) == SHIPPED and n not in (
        "specs.json", "ModelParameters", "LatentCodes", "Logs.pth")])
    rng = np.random.default_rng(0)
    for k, name in enumerate(("bob", "spot")):
        p = rng.uniform(-1, 1, (2000, 3))
        sdf = np.linalg.norm(p, axis=1) - (0.4 + 0.1 * k)
        write_sdf_samples(tmp / "data" / "bob_and_spot" / "samples" / f"{name}.npz",
                          *split_by_sign(np.column_stack([p, sdf])))
    specs = json.loads((exp / "specs.json").read_text())
    (exp / "split.json").write_text(json.dumps({"bob_and_spot": {"samples": ["bob", "spot"]}}))
    specs.update(DataSource=str(tmp / "data"), TrainSplit=str(exp / "split.json"), SamplesPerScene=samples)
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


def test_continue_latest_resumes_a_released_model_with_a_fresh_optimizer(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MESHSDF_QUIET", "0")
    before = tree_sha256(SHIPPED)
    exp = shipped_copy(tmp_path)
    shipped_logs = experiment.load_logs(exp)
    shipped_model = torch.load(exp / "ModelParameters" / "latest.pth", weights_only=True)["model_state_dict"]
    assert not (exp / "OptimizerParameters").exists()

    e0 = SHIPPED_EPOCH
    assert train_deep_sdf.main(["-e", str(exp), "-c", "latest", "--epochs", str(e0 + 1), "--device", "cpu",
                                "--no-reconstruct"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from epoch {e0} of ModelParameters/latest.pth and LatentCodes/latest.pth with a fresh " \
           "optimizer" in err, err
    logs = experiment.load_logs(exp)
    assert logs["log_epochs"] == list(range(1, e0 + 2))
    assert logs["loss"][:e0] == shipped_logs["loss"]  # the history continues, nothing replaced
    record = torch.load(exp / "OptimizerParameters" / "latest.pth", weights_only=True)
    assert record["epoch"] == e0 + 1 and record["optimizer_state_dict"]["state"]  # one Adam step taken
    model = torch.load(exp / "ModelParameters" / "latest.pth", weights_only=True)
    assert model["epoch"] == e0 + 1
    moved = max(float((model["model_state_dict"][k] - v).abs().max()) for k, v in shipped_model.items())
    assert 0 < moved < 1e-2  # continued from the shipped weights (one small step), not from scratch
    assert tree_sha256(SHIPPED) == before


def test_overwrite_moves_the_old_files_aside_byte_for_byte(tmp_path, capsys, monkeypatch):
    """Every output of the old model goes, the demo's (two runs: Optimizations/ and the earlier one kept
    beside it) included, as after the README's quick start; the user's own files stay."""
    import demo_optimizer

    monkeypatch.setenv("MESHSDF_QUIET", "0")
    exp = shipped_copy(tmp_path)
    demo = ["-e", str(exp), "--resolution", "16", "--image-size", "64", "--iterations", "2", "--device", "cpu"]
    assert demo_optimizer.main(demo) == 0 and demo_optimizer.main(demo) == 0
    (exp / "notes.txt").write_text("mine")
    mine = ("specs.json", "split.json", "notes.txt")
    old = {k: v for k, v in tree_sha256(exp, mark=True).items() if k not in mine}
    assert any(k.startswith("Optimizations/") for k in old)
    assert any(k.startswith("Optimizations.previous-") for k in old)
    capsys.readouterr()
    assert train_deep_sdf.main(["-e", str(exp), "--overwrite", "--epochs", "1", "--device", "cpu",
                                "--no-reconstruct"]) == 0
    backups = list((exp / "Backups").iterdir())
    assert len(backups) == 1 and f"moved the previous training files into {backups[0]}" in capsys.readouterr().err
    assert tree_sha256(backups[0], mark=True) == old
    assert sorted(p.name for p in exp.iterdir()) == sorted(["Backups", "LatentCodes", "Logs.pth", "ModelParameters",
                                                            "OptimizerParameters", *mine])
    assert torch.load(exp / "ModelParameters" / "latest.pth", weights_only=True)["epoch"] == 1


def one_line_error(main, argv, prog: str, capsys) -> str:
    """Run ``main(argv)`` as its script does; returns the one error line after checking exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_main(lambda: main(argv), prog=prog)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_train_svr_on_a_deep_sdf_experiment_never_suggests_overwrite(tmp_path, capsys, monkeypatch):
    import train_svr
    from tests.test_bad_inputs import CASES

    monkeypatch.setenv("MESHSDF_QUIET", "1")
    argv = CASES["svr_training_of_a_deep_sdf_experiment"][1](tmp_path)
    for extra in ([], ["--overwrite"], ["-c", "latest"]):
        before = tree_sha256(tmp_path, mark=True)
        line = one_line_error(train_svr.main, argv + extra, "train_svr.py", capsys)
        assert "holds a DeepSDF auto-decoder model" in line and "--overwrite" not in line, line
        assert tree_sha256(tmp_path, mark=True) == before


def test_continue_from_the_newest_snapshot_and_latest_at_num_epochs(tmp_path, capsys, monkeypatch):
    """--continue N of the newest epoch goes on; --continue latest of a finished run trains nothing, says so
    and changes nothing."""
    from tests.test_bad_inputs import trained_to_5

    monkeypatch.setenv("MESHSDF_QUIET", "0")
    exp = trained_to_5(tmp_path)
    before = tree_sha256(exp)
    capsys.readouterr()
    assert train_deep_sdf.main(["-e", str(exp), "-c", "latest", "--device", "cpu", "--no-reconstruct"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"nothing trained: {exp} is already at epoch 5, NumEpochs 5; raise NumEpochs in specs.json or "
                    "pass --epochs 6 or more"), line
    assert tree_sha256(exp) == before
    (exp / "ModelParameters" / "5.pth").write_bytes((exp / "ModelParameters" / "latest.pth").read_bytes())
    for kind in ("OptimizerParameters", "LatentCodes"):
        (exp / kind / "5.pth").write_bytes((exp / kind / "latest.pth").read_bytes())
    assert train_deep_sdf.main(["-e", str(exp), "-c", "5", "--epochs", "6", "--device", "cpu", "--no-reconstruct"]) == 0
    assert torch.load(exp / "ModelParameters" / "latest.pth", weights_only=True)["epoch"] == 6
    assert experiment.load_logs(exp)["log_epochs"] == [1, 2, 3, 4, 5, 6]


def mixed_saves(tmp_path) -> Path:
    """A trained experiment whose LatentCodes/latest.pth holds epoch 7 and ModelParameters/latest.pth epoch 1."""
    from tests.test_bad_inputs import trained

    exp = trained(tmp_path)
    p = exp / "LatentCodes" / "latest.pth"
    experiment.save_torch(dict(torch.load(p, weights_only=True), epoch=7), p)
    return exp


def test_reading_while_a_trainer_saves_waits_for_it_and_names_it(tmp_path, capsys, monkeypatch):
    """Model and codes of different epochs while the experiment's writer runs: a save in progress.  The
    reader waits for the save to end; when it does not, the message names the writer, not the files."""
    import threading

    import demo_optimizer
    from lib.experiment.specs import load_specs

    monkeypatch.setenv("MESHSDF_QUIET", "1")
    exp = mixed_saves(tmp_path)
    codes = exp / "LatentCodes" / "latest.pth"
    with experiment.ExperimentLock(exp, "train_deep_sdf.py"):  # this process plays the trainer
        monkeypatch.setattr(experiment.checkpoints, "WRITER_WAIT_S", 0.3)
        before = tree_sha256(tmp_path)
        line = one_line_error(demo_optimizer.main, ["-e", str(exp), "--target", "ball0", "--init", "ball1",
                                                    "--device", "cpu"], "demo_optimizer.py", capsys)
        assert f"{exp} is being written by train_deep_sdf.py (PID {os.getpid()} on " in line and \
            "ModelParameters/latest.pth is epoch 1, LatentCodes/latest.pth is epoch 7" in line and \
            "run this again when its save is done" in line and "restore" not in line, line
        assert tree_sha256(tmp_path) == before

        monkeypatch.setattr(experiment.checkpoints, "WRITER_WAIT_S", 60.0)
        finish = threading.Timer(0.5, lambda: experiment.save_torch(
            dict(torch.load(codes, weights_only=True), epoch=1), codes))  # the trainer's save completes
        finish.start()
        decoder, _ = experiment.load_decoder_and_codes(exp, load_specs(exp))
        finish.join()
        assert decoder.checkpoint_epoch == 1


def test_check_gradients_refuses_model_and_codes_of_different_epochs(tmp_path, capsys, monkeypatch):
    import check_gradients

    monkeypatch.setenv("MESHSDF_QUIET", "1")
    exp = mixed_saves(tmp_path)
    before = tree_sha256(tmp_path)
    line = one_line_error(check_gradients.main, ["-e", str(exp), "--device", "cpu", "--resolution", "16"],
                          "check_gradients.py", capsys)
    assert "ModelParameters/latest.pth is epoch 1, LatentCodes/latest.pth is epoch 7" in line and \
        "they come from different saves" in line, line
    assert tree_sha256(tmp_path) == before
    line = one_line_error(check_gradients.main, ["-e", str(exp), "--checkpoint", "-1"], "check_gradients.py", capsys)
    assert line == "check_gradients.py: error: --checkpoint epoch must be >= 1, got -1"


def test_a_run_stopped_before_its_first_save_leaves_nothing_to_guard(tmp_path):
    exp = tiny_experiment(tmp_path)
    with experiment.claim_experiment(exp, None):
        assert (exp / experiment.LOCK_FILE).is_file()
        with pytest.raises(MeshSDFError, match="in use by a training run"):
            with experiment.claim_experiment(exp, "latest"):
                pass
    assert not (exp / experiment.LOCK_FILE).exists()
    with experiment.claim_experiment(exp, None):  # no trained files yet: a fresh start goes ahead
        pass


def write_lock(exp: Path, **record) -> None:
    (exp / experiment.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "what": "train_svr.py",
                                                        "since": "then", **record}))


def test_lock_of_a_dead_process_or_of_a_reused_pid_is_taken_over(tmp_path):
    exp = tiny_experiment(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(exp, pid=dead.pid)
    with experiment.ExperimentLock(exp) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    # a live PID whose start time differs from the recorded one is another process: the holder is gone
    write_lock(exp, pid=os.getpid(), start="1")
    with experiment.ExperimentLock(exp):
        pass
    write_lock(exp, pid=os.getpid(), start=experiment.process_start(os.getpid()))
    with pytest.raises(MeshSDFError, match=f"in use by train_svr.py \\(PID {os.getpid()} on "):
        experiment.ExperimentLock(exp).acquire()
    assert (exp / experiment.LOCK_FILE).is_file()  # a refused run never removes the holder's lock


def test_stale_temporaries_are_only_those_this_project_wrote_and_whose_writer_is_gone(tmp_path):
    """A killed save leaves ``.<name>.meshsdf-tmp-<pid>-<random>...``: only such files of a dead writer are
    removed; a user's files that look like temporaries, and a live writer's, are kept byte for byte."""
    exp = tiny_experiment(tmp_path)
    (exp / "ModelParameters").mkdir()
    code = ("import sys; from lib.io import marked_tempfile\n"
            "for d, n, sfx in (('ModelParameters', 'latest.pth', '.tmp.pth'), ('.', 'Logs.pth', '.tmp.pth'),"
            " ('.', '.meshsdf.lock', '.tmp')):\n"
            "    print(marked_tempfile(sys.argv[1] + '/' + d, n, sfx)[1])")
    out = subprocess.run([sys.executable, "-c", code, str(exp)], cwd=REPO, text=True, capture_output=True, check=True)
    stale = [Path(p) for p in out.stdout.split()]  # their writer has exited: as after a SIGKILL mid-save
    from lib.io import marked_tempfile

    fd, live = marked_tempfile(exp / "ModelParameters", "latest.pth", ".tmp.pth")  # this process: still writing
    os.close(fd)
    kept = [exp / "ModelParameters" / "latest.pth", exp / "ModelParameters" / ".hidden_notes", exp / "notes.tmp.txt",
            exp / ".notes.20240101.tmp.txt", exp / "ModelParameters" / ".best.abcdefgh.tmp.pth",
            exp / "ModelParameters" / ".latest.pth.k2j_x9a1.tmp.pth", Path(live)]
    for p in kept:
        p.write_text("mine")
    assert sorted(experiment.remove_stale_temporaries(exp)) == sorted(stale)
    assert all(p.read_text() == "mine" for p in kept) and not any(p.exists() for p in stale)


def test_training_log_off_a_terminal_is_plain_lines_with_loss_lr_and_final_loss(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MESHSDF_QUIET", "0")
    exp = tiny_experiment(tmp_path, epochs=3, scenes=2, batch=2)
    assert train_deep_sdf.main(["-e", str(exp), "--device", "cpu", "--no-reconstruct"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    epochs = [ln for ln in lines if ln.startswith("train: epoch ")]
    assert epochs[0].startswith("train: epoch 1/3  loss ") and epochs[-1].startswith("train: epoch 3/3  loss ")
    assert "lr 0.001/0.002" in epochs[-1]
    logs = experiment.load_logs(exp)
    final = float(np.mean([v for v, e in zip(logs["loss"], logs["loss_epoch"]) if e == 3]))
    assert lines[-1].startswith("trained to epoch 3, final loss ")
    assert float(lines[-1].split("final loss ")[1].split(";")[0]) == pytest.approx(final, rel=1e-4)


def test_plain_progress_writes_first_last_and_rate_limited_lines():
    out = io.StringIO()
    bar = PlainProgress(range(100), desc="demo", unit="it", file=out, min_seconds=3600)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("demo: it 1/100  loss 0.0") and \
        lines[1].startswith("demo: it 100/100  loss 99.0")
    out = io.StringIO()
    bar = PlainProgress(total=5, desc="x", file=out, min_seconds=0)
    for _ in range(5):
        bar.update()
    bar.close()
    assert len(out.getvalue().splitlines()) == 5


def test_quiet_silences_progress_but_not_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MESHSDF_QUIET", "1")
    bar = progress(total=3, desc="q")
    for _ in range(3):
        bar.update()
    bar.close()
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as stop:
        cli_main(lambda: train_deep_sdf.main(["-e", str(tiny_experiment(tmp_path)), "--epochs", "0"]),
                 prog="train_deep_sdf.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "train_deep_sdf.py: error: --epochs must be >= 1, got 0\n"


def test_memory_check_names_the_largest_value_that_fits():
    from lib.runtime import limits

    avail = limits.grid_bytes(100)
    limits.check_grid(100, available=avail)
    with pytest.raises(MeshSDFError, match=r"--resolution 101 needs at least .* the largest --resolution that fits "
                                           r"is 100$"):
        limits.check_grid(101, available=avail)
    with pytest.raises(MeshSDFError, match="no --image-size fits"):
        limits.check_image(64, available=10)


# --------------------------------------------------------------------------- outputs whole or absent

def test_staged_output_is_whole_or_absent_and_never_deletes_a_finished_one(tmp_path):
    from lib.io import staged_dir

    out = tmp_path / "Optimizations"
    with staged_dir(out) as stage:
        (stage.path / "final.ply").write_text("first")
        assert not out.exists()  # nothing in place until the run ends
    assert tree_sha256(out) == {"final.ply": hashlib.sha256(b"first").hexdigest()}
    first = tree_sha256(out, mark=True)

    with pytest.raises(MeshSDFError, match="surface vanished"):  # a failed rerun: old output intact
        with staged_dir(out) as stage:
            (stage.path / "log.json").write_text("{}")
            raise MeshSDFError("surface vanished")
    assert tree_sha256(out, mark=True) == first
    assert tree_sha256(stage.partial) == {"log.json": hashlib.sha256(b"{}").hexdigest()}
    assert stage.partial.name.startswith("Optimizations.incomplete-")

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C before anything was written: nothing left
        with staged_dir(out):
            raise KeyboardInterrupt
    with staged_dir(out) as stage:  # a successful rerun: the old output is moved aside, not deleted
        (stage.path / "final.ply").write_text("second")
    assert (out / "final.ply").read_text() == "second" and tree_sha256(stage.previous, mark=True) == first
    assert stage.previous.name.startswith("Optimizations.previous-")
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_staged_output_never_moves_a_folder_it_did_not_write(tmp_path):
    """``--out .`` or ``--out ~/papers`` by mistake: refused before anything is written; an empty
    folder is simply used; the command's own default folder is moved aside whatever it holds."""
    from lib.io import staged_dir

    mine = tmp_path / "papers"
    mine.mkdir()
    (mine / "draft.tex").write_text("months of work")
    with pytest.raises(MeshSDFError, match=r"already holds files that no earlier run of this command wrote "
                                           r"\(draft.tex\); give --out a new or empty folder"):
        with staged_dir(mine):
            raise AssertionError("not reached")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["papers"] and (mine / "draft.tex").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_dir(empty) as stage:
        (stage.path / "a").write_text("")
    assert stage.previous is None and (empty / "a").is_file()
    with staged_dir(mine, owned=True) as stage:  # e.g. an Optimizations folder of the original's demo
        (stage.path / "a").write_text("")
    assert (stage.previous / "draft.tex").read_text() == "months of work"


def test_staged_output_refuses_files_in_the_way_and_adopts_killed_runs(tmp_path):
    from lib.io import staged_dir

    (tmp_path / "a_file").write_text("mine")
    for out, words in ((tmp_path / "a_file", "is a file; give --out a folder"),
                       (tmp_path / "a_file" / "below", "is below " + str(tmp_path / "a_file") + ", which is a file")):
        with pytest.raises(MeshSDFError, match=words.replace("(", r"\(")):
            with staged_dir(out):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".out.staging-{dead.pid}-x1y2"  # as a SIGKILLed run leaves it
    orphan.mkdir()
    (orphan / "frame.png").write_text("half")
    with staged_dir(tmp_path / "out") as stage:
        (stage.path / "done").write_text("")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.incomplete-")]
    assert len(kept) == 1 and (kept[0] / "frame.png").read_text() == "half" and not orphan.exists()


def test_specs_and_split_saved_with_a_byte_order_mark_load_as_without(tmp_path):
    from lib.datasets import read_split
    from lib.experiment.specs import load_specs

    exp = tiny_experiment(tmp_path)
    plain, split = load_specs(exp), read_split(tmp_path / "split.json")
    for p in (exp / "specs.json", tmp_path / "split.json"):
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())  # what Notepad's "UTF-8 with BOM" writes
    assert load_specs(exp) == plain and read_split(tmp_path / "split.json") == split


def test_staged_output_below_missing_folders_creates_them_only_on_success(tmp_path):
    from lib.io import staged_dir

    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(MeshSDFError):
        with staged_dir(out):
            raise MeshSDFError("bad flag")  # e.g. -e of a folder that does not exist
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out) as stage:
        (stage.path / "a").write_text("1")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_demo_rerun_that_stops_midway_leaves_the_finished_output_byte_for_byte(tmp_path, monkeypatch):
    """A rerun into an existing --out that fails after writing frames: the earlier output is
    untouched, the new run's files are all in out.incomplete-<time> (named in the message)."""
    import demo_optimizer
    from tests.test_demo import vanish_at

    out = tmp_path / "out"
    small = ["-e", str(SHIPPED), "--out", str(out), "--resolution", "16", "--image-size", "64", "--iterations", "3",
             "--device", "cpu"]
    assert demo_optimizer.main(small) == 0
    finished = tree_sha256(out)
    assert {"final.ply", "movie.gif", "log.json", "target.png"} <= set(finished)

    vanish_at(monkeypatch, 1)
    with pytest.raises(MeshSDFError, match="completed iterations are in ") as err:
        demo_optimizer.main(small)
    assert tree_sha256(out) == finished
    partial = Path(str(err.value).rsplit(" are in ", 1)[1])
    assert partial.name.startswith("out.incomplete-") and "log.json" in tree_sha256(partial)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", partial.name])


@pytest.mark.parametrize("script", ["train_deep_sdf", "demo_optimizer", "train_svr", "reconstruct_svr", "metrics_svr",
                                    "prepare_data"])
def test_help_cites_no_document_outside_the_repository(script, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).parse_args(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "usage:" in text
    assert "SPEC" not in text and "section" not in text.lower()


def test_svr_overwrite_moves_the_old_model_aside_once_its_inputs_are_valid(tmp_path, monkeypatch):
    import train_svr
    from tests.test_bad_inputs import svr_experiment

    monkeypatch.setenv("MESHSDF_QUIET", "1")
    exp = svr_experiment(tmp_path, checkpoint=True)
    old = {k: v for k, v in tree_sha256(exp).items() if k != "specs.json"}
    assert "ModelParameters/encoder_latest.pth" in old
    assert train_svr.main(["-e", str(exp), "--overwrite", "--device", "cpu", "--epochs", "1"]) == 0
    backups = list((exp / "Backups").iterdir())
    assert len(backups) == 1 and tree_sha256(backups[0]) == old
    assert torch.load(exp / "ModelParameters" / "decoder_latest.pth", weights_only=True)["epoch"] == 1
