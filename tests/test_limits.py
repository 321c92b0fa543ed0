"""lib.runtime.limits: sizes refused before allocating, with the largest value that fits
(memory given explicitly)."""
import pytest

from lib.runtime import limits
from lib.errors import MeshSDFError


def _largest(err) -> int:
    return int(str(err.value).rsplit(" ", 1)[1])


def test_decoder_names_the_key_that_does_not_fit_and_the_largest_that_does():
    avail = 2 ** 24
    limits.check_decoder(256, [512] * 8, available=avail)  # the original's network: about 8 MiB of weights
    with pytest.raises(MeshSDFError, match=r"NetworkSpecs.dims 200000 \(widest layer\) needs at least") as err:
        limits.check_decoder(256, [200000] * 4, available=avail)
    width = _largest(err)
    assert limits.PARAMETER_BYTES * limits.decoder_parameters(1, [width] * 4) <= avail
    assert limits.PARAMETER_BYTES * limits.decoder_parameters(1, [width + 1] * 4) > avail
    with pytest.raises(MeshSDFError, match=r"CodeLength 2000000000 needs at least") as err:
        limits.check_decoder(2 * 10 ** 9, [512] * 8, available=avail)
    code = _largest(err)
    assert limits.PARAMETER_BYTES * limits.decoder_parameters(code, [512] * 8) <= avail
    assert limits.PARAMETER_BYTES * limits.decoder_parameters(code + 1, [512] * 8) > avail


def test_latent_codes_and_chamfer_samples():
    with pytest.raises(MeshSDFError, match=r"CodeLength 1000000 \(x 1000 training shapes\) .* is 268435$"):
        limits.check_latent_codes(1000, 10 ** 6, available=2 ** 30)
    limits.check_latent_codes(1000, 268435, available=2 ** 30)
    with pytest.raises(MeshSDFError, match="--chamfer-samples 2000000000 needs at least"):
        limits.check_chamfer_samples(2 * 10 ** 9, available=2 ** 30)
    limits.check_chamfer_samples(10000, available=2 ** 30)


@pytest.mark.parametrize("value", [-5, 2 ** 63, 2 ** 64 + 1])
def test_seeds_outside_int64_are_refused(value):
    with pytest.raises(MeshSDFError, match=f"--seed must be between 0 and {2 ** 63 - 1}, got {value}"):
        limits.check_seed(value)


def test_numbers_must_be_finite():
    limits.check_number("--lr", 1e-3)
    for value in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(MeshSDFError, match="--lr must be a finite number > 0"):
            limits.check_number("--lr", value)
    limits.check_number("--regularize", 0.0, strict=False)
    with pytest.raises(MeshSDFError, match=r"--fps must be a finite number >= 0.002 and <= 100, got 1e-300"):
        limits.check_number("--fps", 1e-300, low=0.002, strict=False, high=100.0)
