#!/usr/bin/env python
"""Single-view reconstruction of the test views: encoder code -> raw mesh -> silhouette refinement."""
from __future__ import annotations

import argparse

from lib import checkpoint, runtime
from lib.specs import load_svr_specs, resolve_path
from lib.errors import MeshSDFError, cli_main
from lib.log import info, progress


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="reconstruct_svr.py",
        description="For each instance of the TestSplit and each view: encode the RGBA image, extract the raw "
                    "mesh of the code, then refine the code with Adam on the L1 distance between the rendered "
                    "soft silhouette and the input alpha, through the MeshSDF layer (SPEC section 8). Writes "
                    "<experiment>/Reconstructions/<instance>/<NN>/: predicted.ply, refined.ply, "
                    "input_silhouette.png, raw_silhouette.png, refined_silhouette.png, log.npz (per iteration: "
                    "silhouette_loss, chamfer, normal_consistency, latent_norm, iou) and summary.json.")
    ap.add_argument("-e", "--experiment", required=True, help="experiment folder holding specs.json")
    ap.add_argument("--instances", nargs="+", default=None, metavar="NAME",
                    help="only these instances of the TestSplit (default: all)")
    ap.add_argument("--views", nargs="+", type=int, default=None, metavar="N",
                    help="view indices to reconstruct (default: ReconstructionViews of specs.json)")
    ap.add_argument("--checkpoint", type=checkpoint.parse_epoch, default="latest", metavar="latest|N",
                    help="network snapshot to use (default latest)")
    ap.add_argument("--iterations", type=int, default=None, help="refinement steps (default: RefinementIterations)")
    ap.add_argument("--lr", type=float, default=None, help="refinement learning rate (default: RefinementLearningRate)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="marching-cubes resolution (default: ReconstructionResolution)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from lib import svr

    args = parse_args(argv)
    runtime.apply_thread_policy()  # threads for the cores other processes leave free (MESHSDF_THREADS)
    if args.iterations is not None and args.iterations < 0:
        raise MeshSDFError(f"--iterations must be >= 0, got {args.iterations}")
    if args.lr is not None and not args.lr > 0:
        raise MeshSDFError(f"--lr must be > 0, got {args.lr}")
    if args.resolution is not None and args.resolution < 8:
        raise MeshSDFError(f"--resolution must be >= 8, got {args.resolution}")
    specs = load_svr_specs(args.experiment)
    device = runtime.choose_device(args.device)
    settings = svr.RefineSettings.from_specs(specs, iterations=args.iterations, lr=args.lr, resolution=args.resolution)
    views = args.views if args.views is not None else specs["ReconstructionViews"]
    bad = [v for v in views if not 0 <= v < specs["NumberOfViews"]]
    if bad:
        raise MeshSDFError(f"view {bad[0]} does not exist: views are 0 .. {specs['NumberOfViews'] - 1} "
                           "(NumberOfViews in specs.json)")
    from lib.data import read_split

    if not specs["TestSplit"]:
        raise MeshSDFError(f"{args.experiment}/specs.json has no TestSplit; add the split file of the test instances")
    instances = read_split(resolve_path(specs["TestSplit"]))
    if args.instances:
        known = {i.name for i in instances}
        missing = [n for n in args.instances if n not in known]
        if missing:
            raise MeshSDFError(f"instance {missing[0]!r} is not in the TestSplit {specs['TestSplit']}")
        instances = [i for i in instances if i.name in set(args.instances)]
    renders = svr.render_set_from_specs(specs, instances=instances, cache=False)
    gt_meshes = [svr.ground_truth_mesh(specs, inst) for inst in instances]   # fail early on a missing mesh
    net = svr.load_network(args.experiment, specs, args.checkpoint, device)
    info(f"reconstructing {len(instances)} instances x {len(views)} views with the epoch-{net.checkpoint_epoch} "
         f"network on {device} (N = {settings.resolution}, {settings.iterations} steps, lr {settings.lr:g})")
    jobs = [(k, v) for k in range(len(instances)) for v in views]
    for k, v in progress(jobs, desc="reconstruct_svr", unit="view"):
        image = renders.images(torch.tensor([k]), torch.tensor([v]), device)
        with torch.no_grad():
            code = net(image)[0]
        camera = renders.camera(k, v)
        gt = svr.GroundTruth(*gt_meshes[k], camera, settings.chamfer_samples, device)
        result = svr.reconstruct_view(net.decoder, code, image[0, 3], camera, gt, settings)
        svr.save_view(svr.view_dir(args.experiment, instances[k].name, v), result, instances[k].name, v)
        for m in result.messages:
            info(f"{instances[k].name}/{v:02d}: {m}")
        c0, c1 = result.log["chamfer"][0] * 1000, result.log["chamfer"][-1] * 1000
        info(f"{instances[k].name}/{v:02d}: Chamfer x1000 {c0:.3f} -> {c1:.3f}, silhouette loss "
             f"{result.log['silhouette_loss'][0]:.4f} -> {result.log['silhouette_loss'][-1]:.4f} "
             f"({result.seconds:.1f} s)")
    info(f"wrote {len(jobs)} reconstructions to {checkpoint.reconstructions_dir(args.experiment)}")
    return 0


if __name__ == "__main__":
    cli_main(main)
