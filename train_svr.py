#!/usr/bin/env python
"""Train the single-view reconstruction network (image encoder + DeepSDF decoder) from specs.json.

Runs as is under ``torchrun --nproc_per_node=K`` (DDP over encoder + decoder, see
lib.training.distributed / lib.svr.train.train_svr).  Exit status: 0 done, 2 user error, 143 stopped by
SIGTERM/SIGUSR1/SIGHUP after saving ``latest``.
"""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse
import contextlib

from lib import experiment, runtime
from lib.runtime import limits
from lib.training import distributed
from lib.errors import MeshSDFError
from lib.log import info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="train_svr.py",
        description="Train an RGBA image encoder and a DeepSDF decoder jointly on the SDF loss over the "
                    "TrainSplit of <experiment>/specs.json, as the original MeshSDF does: each step encodes one "
                    "random view of each instance of the batch and fits the decoder's SDF to that instance's "
                    "samples; the decoder learns at LearningRateSchedule[0], the encoder at [1]; after every "
                    "epoch the TestSplit's SDF loss is logged (networks in eval mode). Writes "
                    "ModelParameters/encoder_<e>.pth and decoder_<e>.pth, OptimizerParameters/<e>.pth and "
                    "Logs.pth (loss_sdf, loss_sdf_test) into the experiment folder.")
    cli.add_experiment(ap)
    ap.add_argument("-c", "--continue", dest="resume", type=cli.epoch_type("--continue"), default=None,
                    metavar="latest|N", help="resume from the 'latest' checkpoint (starts from scratch when there "
                                             "is none yet, so it is safe in restart loops) or snapshot epoch N "
                                             "(refused while a newer epoch exists, which it would overwrite)")
    cli.add_device(ap, "cpu, cuda, cuda:N or auto (default: cuda if available; under "
                                                   "torchrun, process k uses cuda:LOCAL_RANK)")
    cli.add_seed(ap, "random seed (default 0; a resumed run restores "
                                                         "the checkpoint's RNG state instead)")
    ap.add_argument("--epochs", type=int, default=None, help="train up to this epoch instead of NumEpochs")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in an experiment that already holds a trained model; its files are moved "
                         "into <experiment>/Backups/<time>/, not deleted, once every input is checked")
    ap.epilog = ("Several GPUs or machines: torchrun --nproc_per_node=K train_svr.py -e EXP [--continue latest] "
                 "(ScenesPerBatch is the global batch). SIGTERM/SIGUSR1/SIGHUP/Ctrl-C: finishes the epoch, "
                 "saves 'latest', "
                 f"exits with status {distributed.EXIT_PREEMPTED} (130 after Ctrl-C).")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from lib.experiment.specs import load_svr_specs
    from lib.svr.data import sdf_render_set, training_set_from_specs
    from lib.svr.train import train_svr

    args = parse_args(argv)
    runtime.apply_thread_policy()  # threads for the cores other processes leave free (MESHSDF_THREADS)
    if args.epochs is not None and args.epochs < 1:
        raise MeshSDFError(f"--epochs must be >= 1, got {args.epochs}")
    limits.check_seed(args.seed)
    specs = load_svr_specs(args.experiment)
    experiment.check_writable(args.experiment)
    ctx = distributed.init_distributed(args.device)  # also checks --device
    claim = contextlib.ExitStack()  # lock, stale temporaries, no surprise overwrite (lib.experiment)
    try:
        last_epoch = args.epochs if args.epochs is not None else specs["NumEpochs"]
        claimed = claim.enter_context(experiment.claim_experiment(
            args.experiment, args.resume, args.overwrite, "train_svr.py", ctx.is_main, svr=True,
            last_epoch=last_epoch, epochs_flag=args.epochs is not None))
        dataset = training_set_from_specs(specs)
        batch = min(specs["ScenesPerBatch"], len(dataset))
        limits.check_sample_batch(specs["SamplesPerScene"], batch, ctx.device)
        limits.check_encoder_images(dataset.renders.image_size, batch, ctx.device)
        test_set = sdf_render_set(specs, "TestSplit") if specs["TestSplit"] else None
        if args.overwrite and specs.get("DecoderInit"):  # the last input a fresh start reads: check it now too
            from lib.experiment.specs import resolve_path
            from lib.svr.network import network_from_specs

            experiment.load_model_state(resolve_path(specs["DecoderInit"]), network_from_specs(specs).decoder,
                                        map_location="cpu")
        claimed.clear()  # --overwrite: every input is valid, now the old model goes into Backups/
        if ctx.is_main:
            info(f"training on {len(dataset)} instances x {specs['NumberOfViews']} views of "
                 f"{dataset.renders.image_size} px on {ctx.where}")
        with distributed.PreemptionGuard() as guard:
            result = train_svr(args.experiment, specs, dataset, ctx.device, resume=args.resume, seed=args.seed,
                               num_epochs=args.epochs, should_stop=guard, test_set=test_set)
    finally:
        distributed.cleanup()
        claim.close()
    status = distributed.stop_status(ctx, result.stopped, result.epoch, guard, args.experiment)
    if status is not None:
        return status
    if ctx.is_main and result.epoch == claimed.start_epoch:  # --continue latest of a run that had reached NumEpochs
        info(f"nothing trained: {args.experiment} is already at epoch {result.epoch}, NumEpochs "
             f"{specs['NumEpochs']}; raise NumEpochs in specs.json or pass --epochs {result.epoch + 1} or more")
    else:
        info(f"trained to epoch {result.epoch}; checkpoints in {args.experiment}")
    return 0


if __name__ == "__main__":
    cli.cli_main(main)
