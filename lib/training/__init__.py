"""Training: when things happen, what is minimised, what is logged, the loop, several processes.

    schedules.py    TrainSettings (specs values), learning-rate schedules, code-regularisation ramp,
                    which checkpoints are due after an epoch
    losses.py       clamped L1, code regularisation, SdfLoss (the module DDP wraps), auto_decoder_loss
    logs.py         Logs.pth histories (new/append/truncate, DeepSDF's form) and TrainingLog, a run's history
    loop.py         optimizer_step, EpochBook (the epochs' bookkeeping, shared with lib.svr) and its pieces,
                    train_auto_decoder, reconstruct_training_shapes
    distributed.py  torchrun: process groups, batch sharding, gradient sync, pre-emption
                    (used as ``distributed.*``; not re-exported here)
"""
from . import distributed  # noqa: F401  (a submodule callers reach as lib.training.distributed)
from .logs import TrainingLog, append_epoch_logs, deepsdf_logs, new_logs, truncate_logs
from .loop import (EpochBook, EpochProgress, NonFiniteLossError, TrainResult, make_adam, make_latent_codes,
                   optimizer_step, reconstruct_training_shapes, resume_point, resume_training, start_epoch,
                   train_auto_decoder, update_beside)
from .losses import SdfLoss, auto_decoder_loss, clamped_l1, code_regularization
from .schedules import (ConstantSchedule, StepSchedule, TrainSettings, WarmupSchedule, checkpoints_due,
                        code_reg_weight, make_schedule, schedules_from_specs, set_learning_rates)

__all__ = [
    # schedules
    "TrainSettings", "StepSchedule", "WarmupSchedule", "ConstantSchedule", "make_schedule", "schedules_from_specs",
    "set_learning_rates", "code_reg_weight", "checkpoints_due",
    # losses
    "clamped_l1", "code_regularization", "SdfLoss", "auto_decoder_loss",
    # logs
    "new_logs", "append_epoch_logs", "deepsdf_logs", "truncate_logs", "TrainingLog",
    # loop
    "NonFiniteLossError", "make_adam", "optimizer_step", "update_beside", "EpochBook", "EpochProgress", "start_epoch",
    "resume_training", "make_latent_codes", "TrainResult", "resume_point", "train_auto_decoder",
    "reconstruct_training_shapes",
    # submodule
    "distributed",
]
