"""The original's per-iteration SVR metrics of one test view, against its ground truth.

- Chamfer: ``samples`` (10,000) area-weighted points on each mesh (fixed seeds, so runs
  repeat), squared nearest-neighbour distances, mean each way, the two means summed (the
  tables show it x1000), in the frame of the SDF samples.
- Normal consistency, image space: depth maps of the ground truth and of the prediction
  from a hard raster (one face per pixel) with the view's camera, normals from the depth
  maps by unprojecting pixels and crossing their right and down differences (the depth map
  as it is, background included, as the original: ``lib.metrics.depth_normals``), and the
  mean SIGNED cosine over the pixels covered in both (tables: x100).

Everything stays on the device of the meshes: sampling uses generators on that device, the
ground truth's points and its nearest-neighbour structure are built once per view
(``lib.metrics.PointReference``: a KD-tree on the CPU, chunked distances elsewhere).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics import (PointReference, depth_normal_field, depth_normals, image_normal_consistency,
                       mesh_normal_consistency, sample_surface, seeded_generator)
from ..render import rasterize
from ..runtime.threads import concurrently

__all__ = ["GT_SEED", "PREDICTION_SEED", "depth_normal_image", "normal_picture", "GroundTruth"]

GT_SEED, PREDICTION_SEED = 0, 1


def depth_normal_image(verts: torch.Tensor, faces: torch.Tensor, camera) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-frame normals (H, W, 3) from the hard-raster depth map of a mesh, and their valid mask (H, W)."""
    cam = camera.to(device=verts.device, dtype=verts.dtype)
    fr = rasterize(verts, faces.to(verts.device), cam)
    return depth_normals(fr.depth.detach(), fr.mask, cam.focal.reshape(-1, 2)[0], cam.principal.reshape(-1, 2)[0])


def normal_picture(verts: torch.Tensor, faces: torch.Tensor, camera) -> np.ndarray:
    """The original's predicted.png / refined.png: RGB uint8 (H, W, 3) = 255 (0.5 - 0.5 n) truncated,
    n the camera-frame normal of the hard-raster depth map at every pixel
    (``lib.metrics.depth_normal_field``: the background gives the normal of its depth plane)."""
    cam = camera.to(device="cpu", dtype=torch.float32)
    h, w = cam.image_size
    if faces.shape[0] == 0:
        depth, mask = torch.zeros(h, w), torch.zeros(h, w, dtype=torch.bool)
    else:
        fr = rasterize(verts.detach().cpu().float(), faces.cpu(), cam)
        depth, mask = fr.depth.detach(), fr.mask
    n = depth_normal_field(depth.double(), mask, cam.focal.reshape(-1, 2)[0], cam.principal.reshape(-1, 2)[0])
    return (255 * (0.5 - 0.5 * n)).clamp(0, 255).floor().to(torch.uint8).numpy()


class GroundTruth:
    """What the per-iteration metrics of one view compare against, prepared once.

    verts (V, 3), faces (F, 3): the ground-truth mesh in the frame of the samples; camera:
    the view's unbatched Camera; samples: Chamfer points per mesh; device: where the
    metrics run (the refinement's device).
    """

    def __init__(self, verts: torch.Tensor, faces: torch.Tensor, camera, samples: int = 10000, device=None):
        self.samples = int(samples)
        self.device = torch.device(device) if device is not None else verts.device
        self.camera = camera.to(device=self.device, dtype=torch.float32)
        self.verts = verts.to(device=self.device, dtype=torch.float32)
        self.faces = faces.to(device=self.device, dtype=torch.int64)
        self.points = sample_surface(self.verts, self.faces, self.samples, seeded_generator(GT_SEED, self.device))
        self.reference = PointReference(self.points)
        self.normals, self.valid = depth_normal_image(self.verts, self.faces, self.camera)

    def chamfer(self, verts: torch.Tensor, faces: torch.Tensor, workers: int = -1) -> float:
        """Squared-distance Chamfer (sum of the two means) to a predicted mesh; NaN if it is empty.
        ``workers``: the KD-tree queries' threads on the CPU (default -1: every core; the same value
        for any count)."""
        if faces.shape[0] == 0:
            return math.nan
        v = verts.detach().to(device=self.device, dtype=torch.float32)
        pts = sample_surface(v, faces.to(self.device), self.samples, seeded_generator(PREDICTION_SEED, self.device))
        predicted = PointReference(pts)
        # each side's points queried in its own tree's leaf order: neighbours in turn (cache)
        to_gt = self.reference.squared_distances(pts, workers, order=predicted.order).mean()
        from_gt = predicted.squared_distances(self.points, workers, order=self.reference.order).mean()
        return float(to_gt + from_gt)

    def normal_consistency(self, verts: torch.Tensor, faces: torch.Tensor) -> float:
        """Image-space signed normal consistency in [-1, 1] (NaN if the images share no valid pixel)."""
        if faces.shape[0] == 0:
            return math.nan
        n, valid = depth_normal_image(verts.detach().to(device=self.device, dtype=torch.float32),
                                      faces.to(self.device), self.camera)
        return image_normal_consistency(n, valid, self.normals, self.valid)

    def scores(self, verts: torch.Tensor, faces: torch.Tensor) -> tuple[float, float]:
        """(:meth:`chamfer`, :meth:`normal_consistency`) of a predicted mesh, the two side by side
        (``lib.runtime.threads.concurrently``), each on its share of the threads (the KD-tree queries
        on as many as the task has; the hard raster then runs its halves in turn): on 2 cores one
        thread each, cheaper than each of them splitting its small passes over both in turn.

        Args:
            verts: (V, 3) the predicted mesh's vertices; faces: (F, 3) int64.
        Returns:
            (Chamfer, normal consistency) as floats, the same values as the two methods.
        """
        chamfer, nc = concurrently([lambda: self.chamfer(verts, faces, workers=torch.get_num_threads()),
                                    lambda: self.normal_consistency(verts, faces)], self.device)
        return chamfer, nc

    def mesh_normal_consistency(self, verts: torch.Tensor, faces: torch.Tensor) -> float:
        """Mesh-space normal consistency (our extra; lib.metrics.mesh_normal_consistency), NaN if empty."""
        if faces.shape[0] == 0:
            return math.nan
        return mesh_normal_consistency(verts.detach().cpu(), faces.cpu(), self.verts.cpu(), self.faces.cpu(),
                                       n=self.samples)
