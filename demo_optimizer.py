#!/usr/bin/env python
"""MeshSDF toy experiment: optimise spot's latent code until its silhouette is bob's.

The silhouette loss against bob (genus 1) drives spot (genus 0) through a topology change.
Writes target.png, initialization.png (shaded renders with alpha, as the original's),
target_silhouette.png, initialization_silhouette.png, movie.gif, final.ply, log.json and
loss.png under <experiment>/Optimizations/ (or --out).
"""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse
import json
from pathlib import Path

import torch

from lib import experiment, runtime
from lib.runtime import limits
from lib.experiment.specs import load_specs, resolve_path
from lib.datasets import read_split
from lib.errors import MeshSDFError
from lib.io import GIF_MAX_FPS, GIF_MIN_FPS, atomic_write, save_gif, save_png, staged_dir, write_ply
from lib.isosurface import MODES
from lib.log import info
from lib.layer import GRADIENTS, mesh_from_sdf
from lib.metrics import silhouette_iou, topology
from lib.optimize import RENDERERS, LatentOptimizer, SilhouetteLoss, optimize
from lib.render import DEMO_AZIMUTH, DEMO_DISTANCE, DEMO_ELEVATION, demo_camera, nr_shade, silhouette
from lib.visualize import dl_ds_face_colors, dl_ds_scale, movie_frame, plot_history, target_outline, to_uint8



def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Optimise the latent code of --init (default spot) with Adam so that its silhouette "
                    "matches the silhouette of --target (default bob), through the differentiable MeshSDF "
                    "layer. Outputs go to <experiment>/Optimizations/: target.png, initialization.png "
                    "(shaded), target_silhouette.png, initialization_silhouette.png, movie.gif (faces "
                    "coloured by dL/ds: red = the surface is pushed outwards, green = inwards), final.ply, "
                    "log.json, loss.png.")
    cli.add_experiment(ap, "experiment folder with specs.json and a trained "
                                                              "checkpoint (e.g. experiments/bob_and_spot)")
    ap.add_argument("--target", default="bob", help="training shape whose silhouette is the target (default bob)")
    ap.add_argument("--init", default="spot", help="training shape whose code is the start (default spot)")
    ap.add_argument("--iterations", "--iters", dest="iterations", type=int, default=100,
                    help="Adam iterations (default 100; --iters is the original's spelling)")
    ap.add_argument("--lr", type=float, default=5e-2, help="Adam learning rate on the code (default 5e-2)")
    ap.add_argument("--resolution", type=int, default=64, help="marching-cubes grid N, N^3 over [-1,1]^3 "
                                                              "(default 64)")
    ap.add_argument("--image-size", "--image_resolution", dest="image_size", type=int, default=512,
                    help="image size in pixels (default 512; --image_resolution is the original's spelling)")
    ap.add_argument("--mode", choices=MODES, default="sparse",
                    help="iso-surface extraction: sparse (default; exact, evaluates the SDF near the surface "
                         "only), dense (every grid point), fast (the paper's heuristic: refresh only the "
                         "voxels around the previous surface; can lose a fast-moving surface)")
    ap.add_argument("--fast", action="store_true", help="same as --mode fast (the paper's --fast flag)")
    ap.add_argument("--gradient", choices=GRADIENTS, default="paper",
                    help="dL/ds rule: paper (unit normal, default) or exact (implicit function theorem)")
    ap.add_argument("--renderer", choices=RENDERERS, default="nr",
                    help="silhouette renderer of the loss: nr (default, the original's: neural_renderer-style "
                         "hard silhouette with Kato et al.'s approximate gradient, in pure torch) or soft (our "
                         "option: soft rasteriser, its exact gradient)")
    cli.add_device(ap)
    ap.add_argument("--out", default=None, help="output folder (default <experiment>/Optimizations)")
    ap.add_argument("--checkpoint", default="latest", type=cli.epoch_type("--checkpoint"), metavar="latest|N",
                    help="checkpoint to load (default latest)")
    ap.add_argument("--outline", action="store_true",
                    help="draw the target silhouette's outline in white over the movie frames (default off: "
                         "the frames are the original's)")
    ap.add_argument("--fps", type=float, default=10.0, help="frames per second of movie.gif (default 10)")
    return ap.parse_args(argv)


def check_args(args) -> str:
    """Validated extraction mode; MeshSDFError for impossible values."""
    if args.fast and args.mode not in ("sparse", "fast"):
        raise MeshSDFError(f"--fast means --mode fast; it conflicts with --mode {args.mode}")
    for name, value, low in (("--iterations", args.iterations, 1), ("--resolution", args.resolution, 8),
                             ("--image-size", args.image_size, 16)):
        if value < low:
            raise MeshSDFError(f"{name} must be >= {low}, got {value}")
    limits.check_number("--lr", args.lr)
    limits.check_number("--fps", args.fps, low=GIF_MIN_FPS, strict=False, high=GIF_MAX_FPS)
    return "fast" if args.fast else args.mode


def shape_index(names: list[str], name: str, flag: str, split_file: Path) -> int:
    if name not in names:
        raise MeshSDFError(f"{flag} {name!r} is not a training shape of {split_file}; valid names: {', '.join(names)}")
    return names.index(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    # whole or absent: written aside, renamed into place at the end (lib.io.staged_dir)
    out = Path(args.out) if args.out else Path(args.experiment) / "Optimizations"
    with staged_dir(out, owned=not args.out) as stage:
        return optimise_demo(args, stage)


def optimise_demo(args, stage) -> int:
    """The demo into ``stage.path`` (a ``lib.io.StagedDir``); returns the exit status."""
    runtime.apply_thread_policy()  # threads for the cores other processes leave free (MESHSDF_THREADS)
    mode = check_args(args)
    exp = Path(args.experiment)
    specs = load_specs(exp)
    split_file = resolve_path(specs["TrainSplit"])
    names = [inst.name for inst in read_split(split_file)]
    target_k = shape_index(names, args.target, "--target", split_file)
    init_k = shape_index(names, args.init, "--init", split_file)
    device = runtime.choose_device(args.device)
    limits.check_grid(args.resolution, device)
    limits.check_image(args.image_size, device, frames=args.iterations)
    decoder, codes = experiment.load_decoder_and_codes(exp, specs, args.checkpoint, device=device)
    if codes.shape[0] != len(names):
        raise MeshSDFError(f"the checkpoint holds {codes.shape[0]} latent codes but {split_file} lists "
                           f"{len(names)} shapes; retrain with train_deep_sdf.py -e {exp}")
    out = stage.path
    camera = demo_camera(image_size=args.image_size, device=device)

    with torch.no_grad():   # exact sparse extraction is dense's mesh; --mode dense asks for dense itself
        tmesh = mesh_from_sdf(decoder, codes[target_k], args.resolution, "dense" if mode == "dense" else "sparse")
    if tmesh.state.empty:
        raise MeshSDFError(f"the code of {args.target!r} gives no surface at resolution {args.resolution} "
                           f"({tmesh.state.message}); check the checkpoint in {exp}")
    target_genus = topology(tmesh.faces)[2]
    # the target is the hard silhouette (as the original's): clean 0/1 coverage, while a soft
    # render of a mesh dims the pixels along its own interior edges
    target = silhouette(tmesh.verts, tmesh.faces, camera, sigma=0)
    loss_fn = SilhouetteLoss(camera, target, loss="mse", renderer=args.renderer)
    save_png(out / "target.png", to_uint8(nr_shade(tmesh.verts, tmesh.faces, camera)))
    save_png(out / "target_silhouette.png", target)
    info(f"target {args.target!r} (genus {target_genus}), start {args.init!r}; {args.iterations} iterations, "
         f"mode {mode}, renderer {args.renderer}, N={args.resolution}, {args.image_size}px, on {device}")

    opt = LatentOptimizer(decoder, codes[init_k], loss_fn, lr=args.lr, resolution=args.resolution, mode=mode,
                          gradient=args.gradient)
    frames, scale, edge = [], [], target_outline(target) if args.outline else None

    def record_frame(it):
        if it.iteration == 0:
            save_png(out / "initialization.png", to_uint8(nr_shade(it.verts, it.faces, camera, face_idx=it.face_idx)))
            save_png(out / "initialization_silhouette.png", it.image)
            scale.append(dl_ds_scale(it.dl_ds, it.faces))
        colors = dl_ds_face_colors(it.dl_ds, it.faces, scale[0])
        frames.append(movie_frame(it.verts, it.faces, colors, camera, edge, face_idx=it.face_idx))
        return {"iou": silhouette_iou(it.image, target)}

    run = optimize(opt, args.iterations, callbacks=[record_frame], desc="demo")

    final = None
    if run.final is not None:
        write_ply(out / "final.ply", run.final.verts, run.final.faces)
        final = {"loss": run.final.loss, "iou": silhouette_iou(run.final.image, target), "genus": run.final.genus,
                 "euler": run.final.euler, "components": run.final.components,
                 "vertices": int(run.final.verts.shape[0]), "faces": int(run.final.faces.shape[0]),
                 "latent": run.latent.tolist()}
    if frames:
        save_gif(out / "movie.gif", frames, fps=args.fps)
    log = {"experiment": str(exp), "checkpoint_epoch": getattr(decoder, "checkpoint_epoch", None),
           "target": args.target, "init": args.init, "target_genus": target_genus,
           "settings": {"iterations": args.iterations, "lr": args.lr, "resolution": args.resolution,
                        "image_size": args.image_size, "mode": mode, "outline": args.outline,
                        "gradient": args.gradient,
                        "device": str(device), "loss": "mse", "renderer": args.renderer,
                        "sigma": loss_fn.sigma if args.renderer == "soft" else None,
                        "camera": {"azimuth": DEMO_AZIMUTH, "elevation": DEMO_ELEVATION, "distance": DEMO_DISTANCE,
                                   "eye": camera.eye.tolist()},
                        "dl_ds_color_scale": scale[0] if scale else None},
           "iterations": run.history, "final": final, "stopped": run.stopped, "seconds_total": run.seconds}
    with atomic_write(out / "log.json") as tmp:
        tmp.write_text(json.dumps(log, indent=1))
    if run.history:
        plot_history(out / "loss.png", run.history, title=f"{args.init} -> {args.target} ({mode}, {args.renderer})",
                     target_genus=target_genus)
    if run.stopped:
        raise MeshSDFError(f"{run.stopped}; outputs of the {len(run.history)} completed iterations are in "
                           f"{stage.partial}")
    first = run.history[0]["loss"]
    info(f"loss {first:.3g} -> {final['loss']:.3g}, silhouette IoU {final['iou']:.3f}, genus "
         f"{run.history[0]['genus']} -> {final['genus']} (target {target_genus}), {run.seconds:.1f} s; "
         f"outputs in {stage.final}")
    return 0


if __name__ == "__main__":
    cli.cli_main(main)
