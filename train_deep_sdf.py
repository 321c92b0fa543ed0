#!/usr/bin/env python
"""Train a DeepSDF auto-decoder (decoder + one latent code per training shape) from specs.json.

Runs as is under ``torchrun --nproc_per_node=K`` (DDP, see lib.training.distributed / lib.training).
Exit status: 0 done, 2 user error, 143 stopped by SIGTERM/SIGUSR1/SIGHUP and 130 by Ctrl-C after saving
``latest``.
"""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse

from lib import experiment, runtime
from lib.runtime import limits
from lib.training import distributed
from lib.experiment.specs import load_specs, resolve_path
from lib.datasets import SdfSamples, read_split
from lib.errors import MeshSDFError
from lib.log import info
from lib.training import reconstruct_training_shapes, train_auto_decoder


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train a DeepSDF auto-decoder on the TrainSplit of <experiment>/specs.json. Writes "
                    "ModelParameters/, OptimizerParameters/, LatentCodes/, Logs.pth and "
                    "Reconstructions/<instance>.ply into the experiment folder.")
    cli.add_experiment(ap)
    ap.add_argument("-c", "--continue", dest="resume", type=cli.epoch_type("--continue"), default=None,
                    metavar="latest|N", help="resume from the 'latest' checkpoint (starts from scratch when there "
                                             "is none yet, so it is safe in restart loops; a model without "
                                             "optimizer state resumes with a fresh optimizer) or snapshot epoch N "
                                             "(refused while a newer epoch exists, which it would overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in an experiment that already holds a trained model; its files are moved "
                         "into <experiment>/Backups/<time>/, not deleted, once every input is checked (without "
                         "this flag or --continue, such "
                         "an experiment is left untouched)")
    cli.add_device(ap, "cpu, cuda, cuda:N or auto (default: cuda if available; under "
                                                   "torchrun, process k uses cuda:LOCAL_RANK)")
    cli.add_seed(ap, "random seed (default 0; a resumed run restores "
                                                         "the checkpoint's RNG state instead)")
    ap.add_argument("--epochs", type=int, default=None, help="train up to this epoch instead of NumEpochs")
    ap.add_argument("--no-reconstruct", action="store_true", help="skip writing Reconstructions/*.ply")
    ap.add_argument("--resolution", type=int, default=128,
                    help="marching-cubes grid resolution of the reconstructions (default 128)")
    ap.epilog = ("Several GPUs or machines: torchrun --nproc_per_node=K train_deep_sdf.py -e EXP [--continue latest] "
                 "(ScenesPerBatch is the global batch). SIGTERM/SIGUSR1/SIGHUP/Ctrl-C: finishes the epoch, "
                 "saves 'latest', "
                 f"exits with status {distributed.EXIT_PREEMPTED} (130 after Ctrl-C).")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.apply_thread_policy()  # threads for the cores other processes leave free (MESHSDF_THREADS)
    if args.epochs is not None and args.epochs < 1:
        raise MeshSDFError(f"--epochs must be >= 1, got {args.epochs}")
    limits.check_seed(args.seed)
    if args.resolution < 2:
        raise MeshSDFError(f"--resolution must be >= 2, got {args.resolution}")
    specs = load_specs(args.experiment)
    experiment.check_writable(args.experiment)
    ctx = distributed.init_distributed(args.device)  # also checks --device
    device = ctx.device
    if not args.no_reconstruct:
        limits.check_grid(args.resolution, device)  # now, not after the training
    last_epoch = args.epochs if args.epochs is not None else specs["NumEpochs"]
    with experiment.claim_experiment(args.experiment, args.resume, args.overwrite, "train_deep_sdf.py", ctx.is_main,
                                     last_epoch=last_epoch, epochs_flag=args.epochs is not None) as claim:
        try:
            split = read_split(resolve_path(specs["TrainSplit"]))
            dataset = SdfSamples(resolve_path(specs["DataSource"]), split)
            limits.check_sample_batch(specs["SamplesPerScene"], min(specs["ScenesPerBatch"], len(dataset)), device)
            limits.check_latent_codes(len(dataset), specs["CodeLength"], device)
            claim.clear()  # --overwrite: every input is valid, now the old model goes into Backups/
            if ctx.is_main:
                info(f"training on {len(dataset)} shapes ({', '.join(dataset.names[:5])}"
                     f"{', ...' if len(dataset) > 5 else ''}) on {ctx.where}")
            with distributed.PreemptionGuard() as guard:
                result = train_auto_decoder(args.experiment, specs, dataset, device, resume=args.resume,
                                            seed=args.seed, num_epochs=args.epochs, should_stop=guard)
        finally:
            distributed.cleanup()
        status = distributed.stop_status(ctx, result.stopped, result.epoch, guard, args.experiment)
        if status is not None:
            return status
        if result.loss is None:  # --continue latest of a run that had reached NumEpochs
            info(f"nothing trained: {args.experiment} is already at epoch {result.epoch}, NumEpochs "
                 f"{specs['NumEpochs']}; raise NumEpochs in specs.json or pass --epochs {result.epoch + 1} or more")
        else:
            info(f"trained to epoch {result.epoch}, final loss {result.loss:.5g}; checkpoints in {args.experiment}")
        if not args.no_reconstruct:
            paths = reconstruct_training_shapes(args.experiment, result.decoder, result.latent_codes.weight,
                                                dataset.names, args.resolution, device)
            info(f"wrote {len(paths)} meshes to {experiment.reconstructions_dir(args.experiment)}")
    return 0


if __name__ == "__main__":
    cli.cli_main(main)
