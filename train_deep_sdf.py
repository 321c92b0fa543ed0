#!/usr/bin/env python
"""Train a DeepSDF auto-decoder (decoder + one latent code per training shape) from specs.json."""
from __future__ import annotations

import argparse

from lib import workspace
from lib.data import SdfSamples, read_split
from lib.errors import MeshSDFError, cli_main
from lib.log import info
from lib.train import reconstruct_training_shapes, train_auto_decoder


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train a DeepSDF auto-decoder on the TrainSplit of <experiment>/specs.json. Writes "
                    "ModelParameters/, OptimizerParameters/, LatentCodes/, Logs.pth and "
                    "Reconstructions/<instance>.ply into the experiment folder.")
    ap.add_argument("-e", "--experiment", required=True, help="experiment folder holding specs.json")
    ap.add_argument("-c", "--continue", dest="resume", type=workspace.parse_epoch, default=None,
                    metavar="latest|N", help="resume from the 'latest' checkpoint or snapshot epoch N")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0; a resumed run restores "
                                                         "the checkpoint's RNG state instead)")
    ap.add_argument("--epochs", type=int, default=None, help="train up to this epoch instead of NumEpochs")
    ap.add_argument("--no-reconstruct", action="store_true", help="skip writing Reconstructions/*.ply")
    ap.add_argument("--resolution", type=int, default=128,
                    help="marching-cubes grid resolution of the reconstructions (default 128)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise MeshSDFError(f"--epochs must be >= 1, got {args.epochs}")
    if args.resolution < 2:
        raise MeshSDFError(f"--resolution must be >= 2, got {args.resolution}")
    specs = workspace.load_specs(args.experiment)
    device = workspace.choose_device(args.device)
    split = read_split(workspace.resolve_path(specs["TrainSplit"]))
    dataset = SdfSamples(workspace.resolve_path(specs["DataSource"]), split)
    info(f"training on {len(dataset)} shapes ({', '.join(dataset.names[:5])}{', ...' if len(dataset) > 5 else ''})"
         f" on {device}")
    result = train_auto_decoder(args.experiment, specs, dataset, device, resume=args.resume, seed=args.seed,
                                num_epochs=args.epochs)
    info(f"trained to epoch {result.epoch}; checkpoints in {args.experiment}")
    if not args.no_reconstruct:
        paths = reconstruct_training_shapes(args.experiment, result.decoder, result.latent_codes.weight,
                                            dataset.names, args.resolution, device)
        info(f"wrote {len(paths)} meshes to {workspace.reconstructions_dir(args.experiment)}")
    return 0


if __name__ == "__main__":
    cli_main(main)
