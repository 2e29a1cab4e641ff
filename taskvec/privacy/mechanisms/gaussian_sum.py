"""`gaussian-sum`: one noisy sum of the units' vectors, each of L2 norm at most `max_grad_norm`, plus
N(0, (z·max_grad_norm)²) per coordinate, released once (the class-means head). For the accountants it is one
DP-SGD step at sampling rate 1, so it is accounted and composed as DP-SGD is (`dp_sgd.SubsampledGaussian`)."""

from __future__ import annotations

from taskvec.privacy.mechanism import register
from taskvec.privacy.mechanisms.dp_sgd import SubsampledGaussian


@register
class GaussianSum(SubsampledGaussian):
    name = "gaussian-sum"
