"""The bounds of nic's integer networks: the hyperprior family's h_s (nic.hyperprior) and
its context networks (nic.context). Whatever picks a table or a mean at the decoder is
computed by them, exactly, the same on every machine (Ballé, Johnston and Minnen,
"Integer networks for data compression with latent-variable models", ICLR 2019).

A layer computes floor((Σ w·a + b) / 2**shift + ½) from integer weights w, activations
a and bias b, in float64: with these bounds every partial sum is an integer below 2**53,
so any BLAS, summing in any order, gives the exact result.
"""

import numpy as np

ACTIVATION_MAX = 4095
"""Integer hidden activations are clipped to 0 … ACTIVATION_MAX (12 bits)."""

WEIGHT_MAX = 32767
"""Integer weights are within ±WEIGHT_MAX (16 bits)."""

BIAS_LIMIT = 2**40
MAX_SHIFT = 40
"""Integer biases are below BIAS_LIMIT in magnitude and shifts at most MAX_SHIFT."""

NARROW_WEIGHT_MAX = 127
"""Weights within ±NARROW_WEIGHT_MAX fit int8: coding-only hyperprior weights store the
context networks' so (integerized within it) and h_a's kernels (scaled to it)."""

MEAN_BITS = 8
"""μ is an integer multiple of 2**−MEAN_BITS."""


def scale_of(shift: np.ndarray) -> np.ndarray:
    """2**−shift as float64 (a power of two, 0 ≤ shift ≤ MAX_SHIFT: multiplying by it is
    exact)."""
    return np.ldexp(1.0, -np.asarray(shift).astype(np.int32))


def finish(acc: np.ndarray, bias: np.ndarray, scale: np.ndarray, relu: bool) -> np.ndarray:
    """A layer's output from its sums ``acc`` (float64, integer-valued): floor((acc + bias)
    · scale + ½), clipped to 0 … ACTIVATION_MAX if ``relu``; ``bias`` and ``scale``
    (:func:`scale_of`) broadcast against ``acc``. In place: ``acc`` is returned."""
    acc += bias
    acc *= scale
    acc += 0.5
    np.floor(acc, out=acc)
    if relu:
        np.clip(acc, 0, ACTIVATION_MAX, out=acc)
    return acc
