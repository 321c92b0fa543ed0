"""MeshSDF library: DeepSDF decoders, differentiable iso-surface extraction and rendering.

Modules (one concern each; see README "Code map"):
    errors      the one user-facing exception type and the script entry-point wrapper
    io          atomic file writes, mesh/image readers and writers
    log         progress bars and messages (the only place lib/ prints)
    specs       specs.json: every key, the original's defaults, validation
    checkpoint  the experiment folder's files: every checkpoint form, read and written
    runtime/    cpus (usable cores, OpenMP's wait policy: set here, before torch loads),
                threads (thread policy, side-by-side work, ThreadSettings), device (device, seeds, RNG states)
    models/     decoder (DeepSDF MLP), encoder (ResNet image encoder)
    data        SDF-sample and image datasets, split files
    sampling    mesh normalisation and SDF sample generation, built-in shapes
    ops/        kernels without policy: marching_cubes (case tables, vectorised cell kernel)
    isosurface  extraction modes on any field: dense, fast and sparse (block-sparse, warm start)
    layer/      the differentiable mesh layer: field (mesh_from_field, SurfaceMesh), sdf (mesh_from_sdf),
                gradient_check (the layer's gradients vs finite differences of re-extracted meshes)
    camera      the one camera model
    render      differentiable silhouettes, z-buffer depth and normals
    metrics     Chamfer distance, normal consistency, IoU, genus
"""

from lib.runtime import cpus as _cpus

# first thing, before anything imports torch: OpenMP reads its wait policy once, when it loads
_cpus.prepare_openmp_env()
