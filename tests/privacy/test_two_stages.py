"""Two stages under one budget: a site releases DP statistics (the `stats-head` mode's `gaussian-sum`), the
merger solves the head from them (version 1), the site then runs DP-SGD from version 1, and the merge onto
version 1 composes both of the site's releases in one ledger, as dp-accounting composes the two mechanisms."""

from __future__ import annotations

from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_reference import dp_sgd_steps, pld_epsilon
from synthetic_data import npz_file

from taskvec.errors import PrivacyError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.privacy.ledger import PrivacyBudget
from taskvec.training.loop import FinetuneConfig, finetune


def test_statistics_then_dp_sgd_compose_in_the_merge_budget(tmp_path: Path) -> None:
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, dp_compatible=True, seed=0)
    base = tmp_path / "base.safetensors"
    save_model(net, spec, base)
    data = npz_file(tmp_path / "d.npz", n=40)

    # stage 1: the statistics head, one Gaussian release at ε = 1
    probe = finetune(base, data, tmp_path / "probe", FinetuneConfig(
        train="stats-head:16", val_fraction=0.0, device="cpu", contributor="h",
        dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0)))
    stats = export_vector(probe.model_path, base, tmp_path / "stats.safetensors").path
    v1 = merge_vectors([stats], base, tmp_path / "v1.safetensors", method="lda-head").path
    assert read_kind(v1, "model").model.number == 1

    # stage 2: DP-SGD of the norms, biases and head from version 1
    body = finetune(v1, data, tmp_path / "body", FinetuneConfig(
        train="norm-bias", steps=6, val_fraction=0.0, device="cpu", contributor="h",
        dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=2.0)))
    vec = export_vector(body.model_path, v1, tmp_path / "body.safetensors").path

    (first,) = read_kind(stats, "vector").vector.ledger
    (second,) = read_kind(vec, "vector").vector.ledger
    assert (first["mechanism"], second["mechanism"]) == ("gaussian-sum", "dp-sgd")
    want = pld_epsilon([dpa.GaussianDpEvent(first["noise_multiplier"]),
                        dp_sgd_steps(second["noise_multiplier"], second["sample_rate"], second["steps"])], 1e-5)
    assert first["epsilon"] < want and second["epsilon"] < want  # composed, more than either alone

    merged = merge_vectors([vec], v1, tmp_path / "v2.safetensors", method="mean",
                           budget=PrivacyBudget(max_epsilon=want * 1.05, unit="image"))
    spent = merged.record["privacy_budget"]["contributors"]["h"]
    assert (spent["vectors"], spent["earlier"], spent["runs"]) == (2, 1, 2)
    assert spent["epsilon"] == pytest.approx(want, rel=0.03)
    with pytest.raises(PrivacyError, match="1 already in the base's lineage"):  # a budget below the composition
        merge_vectors([vec], v1, tmp_path / "v2b.safetensors", method="mean",
                      budget=PrivacyBudget(max_epsilon=second["epsilon"] * 1.01, unit="image"))
