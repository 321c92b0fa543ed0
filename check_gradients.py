#!/usr/bin/env python
"""Check the MeshSDF layer's gradients on a trained DeepSDF decoder.

For the latent code and each layer of the decoder of ``-e <experiment>``: the layer's
gradient (paper and exact rules) of a surface integral over the extracted mesh, against
finite differences of meshes extracted again at displaced parameters (lib.layer.gradient_check).
Prints one line per parameter group with the relative errors.
"""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse
from pathlib import Path

import torch

from lib import experiment, runtime
from lib.runtime import limits
from lib.errors import MeshSDFError
from lib.layer.gradient_check import check_gradients, format_report
from lib.isosurface import MODES
from lib.log import info
from lib.experiment.specs import load_specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    cli.add_experiment(ap, "experiment directory (specs.json, checkpoints)")
    ap.add_argument("-c", "--checkpoint", default="latest", type=cli.epoch_type("--checkpoint"),
                    metavar="latest|N", help="checkpoint to load (default latest)")
    ap.add_argument("--code", type=int, default=0, help="index of the training code to check at (default 0)")
    ap.add_argument("--resolution", type=int, default=256,
                    help="marching-cubes grid points per axis (default 256; the finite differences need a fine grid)")
    ap.add_argument("--mode", choices=MODES, default="sparse", help="extraction mode (default sparse)")
    cli.add_device(ap)
    args = ap.parse_args(argv)
    if args.resolution < 16:
        raise MeshSDFError(f"--resolution must be >= 16, got {args.resolution}")
    exp = Path(args.experiment)
    specs = load_specs(exp)
    device = runtime.choose_device(args.device)
    limits.check_grid(args.resolution, device)
    decoder, codes = experiment.load_decoder_and_codes(exp, specs, args.checkpoint, device=device)  # one save
    if not 0 <= args.code < codes.shape[0]:
        raise MeshSDFError(f"--code {args.code}: the checkpoint holds codes 0..{codes.shape[0] - 1}")
    code = codes[args.code].detach().clone()
    for p in decoder.parameters():
        p.requires_grad_(False)
    groups = {"latent code": [code]}
    for name, module in decoder.named_children():
        params = list(module.parameters())
        if params:
            groups[name] = params

    def field(points):
        return decoder(torch.cat((code.reshape(1, -1).expand(points.shape[0], -1), points), 1)).reshape(-1)

    checks = check_gradients(field, groups, args.resolution, mode=args.mode, device=device)
    info(f"{exp}: code {args.code}, N = {args.resolution}, loss = surface integral of "
         "(1 + 0.5 x - 0.3 z + 0.25 y^2); finite differences of re-extracted meshes vs the layer")
    for line in format_report(checks):
        info(line)
    worst = max(c.error["exact"] for c in checks)
    info(f"largest relative error of the exact rule: {100 * worst:.2f}%")
    return 0


if __name__ == "__main__":
    cli.cli_main(main)
