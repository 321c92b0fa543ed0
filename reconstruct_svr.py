#!/usr/bin/env python
"""Single-view reconstruction of the test split as the original evaluates it: encoder code -> raw
mesh -> silhouette refinement, per-iteration Chamfer and normal consistency.

Under ``torchrun --nproc_per_node=K`` the views to do are shared among the K processes (gloo
on the CPU, one GPU per process on CUDA): each takes the next view nobody has taken
(lib.training.distributed.SharedCounter), so every view is done exactly once and the
per-instance folders are the ones a single process writes.  A process that dies loses only
the views it had in progress; the same command run again does the rest (finished folders
are skipped)."""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse

from lib import runtime
from lib.runtime import limits
from lib.errors import MeshSDFError
from lib.io import check_writable_folder
from lib.log import info, progress
from lib.training import distributed


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="reconstruct_svr.py",
        description="For each instance of the TestSplit (item i seen from view np.random.seed(i); "
                    "randint(0, NumberOfViews), as the original): encode the RGBA image, extract the raw mesh of "
                    "the code, then refine the code with Adam on the L1 distance between the rendered soft "
                    "silhouette and the input alpha, through the MeshSDF layer. Writes "
                    "<experiment>/Reconstructions/<checkpoint>/<instance>/ (input.png, input_silhouette.png, "
                    "predicted.ply/.png/_silhouette.png, refined.ply/.png/_silhouette.png, log_silhouette.npy, "
                    "log_chd.npy, log_nc.npy, log_latent.npy; ours: log_iou.npy, meta.json). An instance whose "
                    "folder exists is skipped, so an interrupted run resumes. Under torchrun --nproc_per_node=K "
                    "the K processes share the instances (each done once; one GPU per process on CUDA).")
    cli.add_experiment(ap)
    ap.add_argument("-c", "--continue", dest="checkpoint", type=cli.epoch_type("--continue"), default="latest",
                    metavar="latest|N", help="network checkpoint to use (default latest)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="marching-cubes resolution (default: ReconstructionResolution of specs.json, 256)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="refinement iterations T: T + 1 Adam steps and T + 1 log entries, as the original "
                         "(default: RefinementIterations, 100)")
    ap.add_argument("--regularize", type=float, default=0.0,
                    help="weight w of w * mean(z^2) added to the refinement loss (default 0.0)")
    ours = ap.add_argument_group("options of this project (defaults are the original's protocol)")
    ours.add_argument("--lr", type=float, default=None,
                      help="refinement learning rate (default: RefinementLearningRate, 5e-5)")
    ours.add_argument("--sigma", type=float, default=None,
                      help="soft-silhouette sigma in squared NDC units (default: SilhouetteSigma, 1e-4; the blur "
                           "radius follows it, BlurSigmaRatio)")
    ours.add_argument("--mode", choices=("fast", "sparse", "dense"), default=None,
                      help="extraction every iteration (default: ExtractionMode, 'fast' = the original's "
                           "heuristic; 'sparse' and 'dense' are exact)")
    ours.add_argument("--dense-start", action="store_true",
                      help="fast mode: evaluate the whole N^3 grid for the first mesh, as the original does "
                           "(default: only the band around the surface, with the same meshes wherever the exact "
                           "sparse extraction finds every piece of surface; docs/extraction.md)")
    ours.add_argument("--views", nargs="+", type=int, default=None, metavar="N",
                      help="reconstruct these views of every instance (folders <instance>_viewNN except for the "
                           "protocol's view) instead of the protocol's one view")
    ours.add_argument("--split", choices=("test", "validation"), default="test",
                      help="TestSplit (default) or ValidationSplit, to choose settings without the test views")
    ours.add_argument("--instances", nargs="+", default=None, metavar="NAME", help="only these instances of the split")
    ours.add_argument("--chamfer-samples", type=int, default=None,
                      help="surface samples per mesh for the Chamfer distance (default: ChamferSamples, 10000)")
    ours.add_argument("--out", default=None, metavar="DIR",
                      help="write the instance folders here instead of Reconstructions/<checkpoint>/")
    cli.add_device(ours, "cpu, cuda, cuda:N or auto (default: cuda if available; under torchrun process k uses "
                         "cuda:LOCAL_RANK)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from lib.experiment.specs import load_svr_specs

    args = parse_args(argv)
    runtime.apply_thread_policy()  # threads for the cores other processes leave free (MESHSDF_THREADS)
    if args.iterations is not None and args.iterations < 0:
        raise MeshSDFError(f"--iterations must be >= 0, got {args.iterations}")
    if args.lr is not None:
        limits.check_number("--lr", args.lr)
    if args.resolution is not None and args.resolution < 8:
        raise MeshSDFError(f"--resolution must be >= 8, got {args.resolution}")
    limits.check_number("--regularize", args.regularize, strict=False)
    if args.sigma is not None:
        limits.check_number("--sigma", args.sigma)
    if args.chamfer_samples is not None and args.chamfer_samples < 100:
        raise MeshSDFError(f"--chamfer-samples must be >= 100, got {args.chamfer_samples}")
    specs = load_svr_specs(args.experiment)
    ctx = distributed.init_distributed(args.device)  # also checks --device
    try:
        return reconstruct_split(args, specs, ctx)
    finally:
        distributed.cleanup()


def reconstruct_split(args: argparse.Namespace, specs, ctx: distributed.DistContext) -> int:
    """The views of the split not done yet, shared among the processes of ``ctx``; returns 0."""
    import torch

    from lib.svr import data, evaluate, network, reconstruct

    device = ctx.device
    settings = reconstruct.RefineSettings.from_specs(specs, iterations=args.iterations, lr=args.lr,
                                                     resolution=args.resolution, mode=args.mode, sigma=args.sigma,
                                                     chamfer_samples=args.chamfer_samples, regularize=args.regularize,
                                                     dense_start=args.dense_start or None)
    limits.check_grid(settings.resolution, device)
    limits.check_chamfer_samples(settings.chamfer_samples, device,
                                 name="--chamfer-samples" if args.chamfer_samples is not None else "ChamferSamples")
    num_views = specs["NumberOfViews"]
    bad = [v for v in args.views or [] if not 0 <= v < num_views]
    if bad:
        raise MeshSDFError(f"view {bad[0]} does not exist: views are 0 .. {num_views - 1} "
                           "(NumberOfViews in specs.json)")
    split_key = data.SPLIT_KEYS[args.split]
    instances = data.split_instances(specs, split_key)
    items = list(range(len(instances)))     # item index in split order: it seeds the protocol's view
    if args.instances:
        known = {i.name for i in instances}
        missing = [n for n in args.instances if n not in known]
        if missing:
            raise MeshSDFError(f"instance {missing[0]!r} is not in the {split_key} {specs[split_key]}")
        items = [k for k in items if instances[k].name in set(args.instances)]
    renders = data.render_set_from_specs(specs, instances=instances, cache=False)
    limits.check_encoder_images(renders.image_size, 1, device, training=False)
    gt_meshes = {k: data.ground_truth_mesh(specs, instances[k]) for k in items}   # fail early on a missing mesh
    root = reconstruct.output_root(args.experiment, args.checkpoint, args.out)
    check_writable_folder(root)  # before any work
    net = network.load_network(args.experiment, specs, args.checkpoint, device)
    jobs = []
    for k in items:
        default = data.evaluation_view(k, num_views)
        for v in (args.views if args.views is not None else [default]):
            folder = root / reconstruct.instance_folder_name(instances[k].name, v, default)
            if not folder.exists():
                jobs.append((k, v, folder))
    done = len(items) * len(args.views or [0]) - len(jobs)
    distributed.barrier()   # every process has listed the finished folders before any writes one
    if ctx.is_main:
        info(f"reconstructing {len(jobs)} views of the {split_key} ({done} done before, skipped) with the epoch-"
             f"{net.checkpoint_epoch} network on {ctx.where} (N = {settings.resolution}, {settings.mode} extraction, "
             f"{settings.iterations} + 1 steps, lr {settings.lr:g}) into {root}")
    who = f"[rank {ctx.rank}] " if ctx.distributed else ""
    mine = _taken(jobs, distributed.SharedCounter("reconstruct_svr"))
    written = 0
    for k, v, folder in progress(mine, total=len(jobs), desc="reconstruct_svr", unit="view", disable=ctx.distributed):
        name = instances[k].name
        image = renders.images(torch.tensor([k]), torch.tensor([v]), device)
        with torch.no_grad():
            code = net(image)[0]
        camera = renders.camera(k, v)
        gt = evaluate.GroundTruth(*gt_meshes[k], camera, settings.chamfer_samples, device)
        result = reconstruct.reconstruct_view(net.decoder, code, image[0, 3], camera, gt, settings)
        reconstruct.save_instance(folder, result, image[0], camera,
                                  {"instance": name, "view": int(v), "item": int(k), "split": args.split,
                                   "checkpoint_epoch": int(net.checkpoint_epoch),
                                   "settings": vars(settings)})
        written += 1
        for m in result.messages:
            info(f"{who}{folder.name}: {m}")
        c0, c1 = result.log["chamfer"][0] * 1000, result.log["chamfer"][-1] * 1000
        info(f"{who}{folder.name} (view {v:02d}): Chamfer x1000 {c0:.3f} -> {c1:.3f}, silhouette loss "
             f"{result.log['silhouette_loss'][0]:.4f} -> {result.log['silhouette_loss'][-1]:.4f} "
             f"({result.seconds:.1f} s)")
    total = distributed.sum_over_ranks(written)
    if ctx.is_main:
        info(f"wrote {total} reconstructions to {root}" + (f" ({ctx.where})" if ctx.distributed else ""))
    return 0


def _taken(jobs: list, queue: distributed.SharedCounter):
    """The jobs this process takes from ``queue``: each the next one no process has taken, until none is left."""
    while (j := queue.take()) < len(jobs):
        yield jobs[j]


if __name__ == "__main__":
    cli.cli_main(main)
