"""The op tests' one tolerance rule: a kernel is no worse than plain PyTorch in its precision.

For a kernel output ``got``, ``ref64`` the same quantity from the pure-PyTorch reference in
float64 (on the same low-precision inputs) and ``low`` the reference run by plain PyTorch in the
kernel's precision:

    max |got - ref64|  <=  2 * max |low - ref64|  +  ulps * eps(dtype) * max(scale, floor)

The first term is the house rule (STYLE.md: about twice PyTorch's own error). The second, a few
units in the last place of ``dtype`` at the output's magnitude ``scale``, covers outputs that
PyTorch happens to get exact (one rounding at the end, an empty tensor). Non-finite reference
values (an attention row that sees no key has lse = +inf) must be matched in place and are left
out of the error.
"""

import torch


def eps(dtype):
    """One unit in the last place at 1.0: 2^-10 in fp16, 2^-7 in bf16, 2^-23 in fp32."""
    return torch.finfo(dtype).eps


def max_error(x, ref):
    """Largest |x - ref| over the finite entries of ``ref``, whose non-finite entries ``x`` must
    match (0 when there is nothing to compare)."""
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "non-finite values where the reference has none"
    return (x - ref)[finite].abs().max().item() if finite.any() else 0.0


def magnitude(t):
    """Largest |value| over the finite entries of ``t`` (0 when there are none)."""
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_no_worse_than_torch(name, got, ref64, low, dtype, scale=None, ulps=4, floor=1.0):
    """Assert the rule above for ``got``, in units of ``dtype``; ``scale`` defaults to the
    reference's magnitude, and never counts for less than ``floor``. ``low`` may also be a tuple
    of PyTorch results (e.g. two ways PyTorch computes it): the bound takes the worst."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an unwritten tile?)"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    scale = magnitude(ref64) if scale is None else scale
    err = max_error(got, ref64)
    lows = low if isinstance(low, tuple) else (low,)
    bound = 2 * max(max_error(t, ref64) for t in lows) + ulps * eps(dtype) * max(scale, floor)
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e} (scale {scale:.2e})"
