"""An experiment folder: its specs.json, its files, who may write it, and what fits in memory.

    specs.py        specs.json: every key, the original's defaults, validation, path resolution
    checkpoints.py  the folder's layout and every checkpoint form (auto-decoder, SVR), Logs.pth files
    lock.py         the one-writer lock file (ExperimentLock) and, for readers, the run writing now
    writer.py       what a training run checks before writing: claim_experiment, stale temporaries,
                    --overwrite's backups (move_aside)

The names below are re-exported so that callers write ``experiment.load_decoder_and_codes``
(``checkpoints.WRITER_WAIT_S``, the readers' wait, is read from its module).
"""
from .checkpoints import (BACKUPS_DIR, LATENT_CODES_DIR, LOGS_FILE, MODEL_PARAMS_DIR, OPTIMIZATIONS_DIR,
                          OPTIMIZER_PARAMS_DIR, RECONSTRUCTIONS_DIR, SVR_PARTS, check_same_epoch, checkpoint_path,
                          load_checkpoint, load_decoder, load_decoder_and_codes, load_latent_codes,
                          load_logs, load_model_state, load_svr_checkpoint, load_svr_networks, load_torch, logs_path,
                          read_while_saved, reconstructions_dir, record_epoch, save_checkpoint,
                          save_logs, save_svr_checkpoint, save_torch, saved_epochs, snapshot_epochs, svr_model_path,
                          svr_snapshot_epochs)
from .lock import LOCK_FILE, ExperimentLock, active_writer, process_alive, process_start
from .specs import (DEEPSDF_KEYS, NETWORK_SPECS_KEYS, REPO_ROOT, SPECS_FILE, SVR_KEYS, Key, load_specs,
                    load_svr_specs, resolve_path, validate_specs)
from .writer import (TRAINING_OUTPUTS, Claim, check_writable, claim_experiment, model_outputs, move_aside,
                     remove_stale_temporaries, trained_files)

__all__ = [
    # specs.json
    "SPECS_FILE", "REPO_ROOT", "Key", "DEEPSDF_KEYS", "NETWORK_SPECS_KEYS", "SVR_KEYS", "load_specs",
    "load_svr_specs", "validate_specs", "resolve_path",
    # layout and checkpoint files
    "MODEL_PARAMS_DIR", "OPTIMIZER_PARAMS_DIR", "LATENT_CODES_DIR", "LOGS_FILE", "RECONSTRUCTIONS_DIR",
    "BACKUPS_DIR", "OPTIMIZATIONS_DIR", "SVR_PARTS",
    "checkpoint_path", "svr_model_path", "logs_path", "reconstructions_dir", "snapshot_epochs",
    "svr_snapshot_epochs", "saved_epochs", "record_epoch", "save_torch", "load_torch", "save_checkpoint",
    "load_checkpoint", "load_model_state", "load_latent_codes", "load_decoder", "load_decoder_and_codes",
    "check_same_epoch", "read_while_saved", "save_svr_checkpoint", "load_svr_checkpoint", "load_svr_networks",
    "save_logs", "load_logs",
    # the writer
    "LOCK_FILE", "ExperimentLock", "active_writer", "process_alive", "process_start", "TRAINING_OUTPUTS", "Claim",
    "claim_experiment", "check_writable", "remove_stale_temporaries", "trained_files", "model_outputs",
    "move_aside",
    # submodule
]
