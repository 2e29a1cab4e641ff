"""`gaussian-sum`: one noisy sum of the units' vectors, each of L2 norm at most `max_grad_norm`, plus
N(0, (z·max_grad_norm)²) per coordinate, released once (the class-means head). For the accountants it is one
DP-SGD step at sampling rate 1, so it is accounted and composed as DP-SGD is (`dp_sgd.SubsampledGaussian`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskvec.errors import PrivacyConfigError
from taskvec.privacy.accounting import calibrate_noise, dp_sgd_epsilon
from taskvec.privacy.mechanism import register
from taskvec.privacy.mechanisms.dp_sgd import SubsampledGaussian

if TYPE_CHECKING:
    from taskvec.privacy.dpsgd import DPConfig


@register
class GaussianSum(SubsampledGaussian):
    name = "gaussian-sum"


def release_noise(dp: DPConfig, what: str) -> tuple[float, float, str]:
    """(noise multiplier, ε, accountant) of one release of `what`: the given multiplier, or the one calibrated to
    the target ε (composed with `dp.prior`); a given multiplier whose ε passes a given target is refused. ε is
    the release's own."""
    z = dp.noise_multiplier or calibrate_noise(float(dp.target_epsilon or 0), dp.delta, 1.0, 1, dp.prior)
    eps, accountant = dp_sgd_epsilon([(z, 1.0, 1)], dp.delta)
    total = dp_sgd_epsilon([*dp.prior, (z, 1.0, 1)], dp.delta)[0] if dp.prior else eps
    if dp.target_epsilon is not None and total > dp.target_epsilon:
        with_prior = " composed with the earlier releases" if dp.prior else ""
        raise PrivacyConfigError(f"noise_multiplier {z:g} gives ε = {total:.3g} in the one {what} release"
                                 f"{with_prior}, above target_epsilon {dp.target_epsilon:g}", field="noise_multiplier",
                                 got=z)
    return z, eps, accountant
