#!/usr/bin/env python
"""Train the single-view reconstruction network (image encoder + DeepSDF decoder) from specs.json."""
from __future__ import annotations

import argparse

from lib import workspace
from lib.errors import MeshSDFError, cli_main
from lib.log import info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="train_svr.py",
        description="Train an RGBA image encoder and a DeepSDF decoder jointly on the SDF loss (SPEC section 8) "
                    "over the TrainSplit of <experiment>/specs.json: each step encodes one random view of each "
                    "instance of the batch and fits the decoder's SDF to that instance's samples. Writes "
                    "ModelParameters/ (encoder and decoder), OptimizerParameters/ and Logs.pth into the "
                    "experiment folder.")
    ap.add_argument("-e", "--experiment", required=True, help="experiment folder holding specs.json")
    ap.add_argument("-c", "--continue", dest="resume", type=workspace.parse_epoch, default=None,
                    metavar="latest|N", help="resume from the 'latest' checkpoint or snapshot epoch N")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0; a resumed run restores "
                                                         "the checkpoint's RNG state instead)")
    ap.add_argument("--epochs", type=int, default=None, help="train up to this epoch instead of NumEpochs")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from lib.svr import load_svr_specs, train_svr, training_set_from_specs

    args = parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise MeshSDFError(f"--epochs must be >= 1, got {args.epochs}")
    specs = load_svr_specs(args.experiment)
    device = workspace.choose_device(args.device)
    dataset = training_set_from_specs(specs)
    info(f"training on {len(dataset)} instances x {specs['NumberOfViews']} views of {specs['ImageSize']} px "
         f"on {device}")
    result = train_svr(args.experiment, specs, dataset, device, resume=args.resume, seed=args.seed,
                       num_epochs=args.epochs)
    info(f"trained to epoch {result.epoch}; checkpoints in {args.experiment}")
    return 0


if __name__ == "__main__":
    cli_main(main)
