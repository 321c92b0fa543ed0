"""Hand-written kernels of the DeepSDF decoder, each computing what its autograd path computes.

- :mod:`.fused`: the fused forward + backward of the clamped-L1 training loss;
- :mod:`.inference`: values, and values with input gradients, of a frozen decoder;
- :mod:`.elementwise`: positional encoding and the counter-based dropout masks both share
  with :mod:`lib.models.decoder`.
"""
