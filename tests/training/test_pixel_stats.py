"""`finetune --train stats-head:P` on a segmentation base: the per-pixel features against the model's own
forward pass, the statistics and the solved head against an independent numpy computation on every pixel, one
image's bounded contribution (the test fails without the 1/pixels weight), and the `lda-head` merge of two
sites against the pooled data's head (U-Net: a 3×3 head; FPN: a 1×1 head under a 4× upsampling)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from stats_reference import lda_reference, unit_projected
from synthetic_data import seg_folder

from taskvec.errors import ConfigError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import ModelSpec, build_base, load_model, save_model
from taskvec.progress import no_track
from taskvec.training import sufficient
from taskvec.training.data import ImageDataset, Normalizer, load_data
from taskvec.training.loop import FinetuneConfig, finetune
from taskvec.training.modes import stats_head

HEAD = ("segmentation_head.0.weight", "segmentation_head.0.bias")
P = 12


def _base(tmp: Path, decoder: str) -> tuple[Path, ImageDataset]:
    net, spec = build_base("test_efficientnet", task="segmentation", num_classes=2, img_size=32, decoder=decoder,
                           seed=0)
    save_model(net, spec, tmp / f"{decoder}.safetensors")
    train = load_data(seg_folder(tmp / "data", n=10), ModelSpec.from_dict(spec.to_dict()), val_fraction=0.0).train
    assert train is not None
    return tmp / f"{decoder}.safetensors", train


def _reference_pixels(base: Path, data: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's feature (float64) and class, read off the model's own output: with the head's weight set to
    the unit vectors e_j, e_j+1 and no bias, its two output maps are features j and j+1 at every pixel."""
    net: Any = load_model(base, "cpu").eval()
    conv = net.segmentation_head[0]
    dim = conv.weight[0].numel()
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    x = Normalizer(spec, torch.device("cpu"))(torch.stack([data[i][0] for i in range(len(data))]))
    columns = []
    with torch.no_grad():
        conv.bias.zero_()
        for j in range(0, dim, 2):
            conv.weight.copy_(torch.eye(dim, dtype=torch.float64)[j:j + 2].reshape(conv.weight.shape))
            columns.append(net(x).double().flatten(2))  # images × 2 × pixels
    feats = torch.cat(columns, 1).transpose(1, 2).reshape(-1, dim)
    return feats.numpy(), np.concatenate([np.asarray(data[i][1]).ravel() for i in range(len(data))])


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
def test_pixel_statistics_and_head_match_the_model_s_own_pixels(tmp_path: Path, decoder: str) -> None:
    base, train = _base(tmp_path, decoder)
    run = finetune(base, train, tmp_path / "run", FinetuneConfig(train=f"stats-head:{P}", val_fraction=0.0,
                                                                  device="cpu"))
    feats, labels = _reference_pixels(base, train)
    pixels = 32 * 32
    assert len(feats) == len(train) * pixels
    record = read_kind(tmp_path / "run" / stats_head.STATISTICS_FILE, "statistics").meta["sufficient"]
    assert record["features"]["dim"] == feats.shape[1] == {"unet": 16 * 9, "fpn": 128}[decoder]
    assert record["head"] == list(HEAD)
    proj = sufficient.projection(record["features"]["projection"]["seed"], feats.shape[1], P)
    g, nu = unit_projected(feats, proj)
    stats = load_file(str(tmp_path / "run" / stats_head.STATISTICS_FILE))
    counts = np.bincount(labels, minlength=2) / pixels  # each image's pixels weigh 1/pixels
    np.testing.assert_allclose(stats["sufficient.counts"], counts, rtol=1e-9)
    np.testing.assert_allclose(stats["sufficient.sums"], np.stack([g[labels == c].sum(0) for c in range(2)]) / pixels,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["sufficient.moments"], g.T @ g / pixels, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["sufficient.log_norms"], [len(train) * np.log(nu)], rtol=1e-4)
    weight, bias = lda_reference(feats, labels, 2, proj, sufficient.DEFAULT_SHRINK)  # uniform weights cancel
    got = load_file(str(run.model_path))
    np.testing.assert_allclose(got[HEAD[0]].reshape(2, -1), weight, rtol=1e-3, atol=1e-4 * np.abs(weight).max())
    np.testing.assert_allclose(got[HEAD[1]], bias, rtol=1e-3, atol=1e-4)
    before = load_file(str(base))
    assert all(np.array_equal(v, before[k]) for k, v in got.items() if k not in HEAD)  # the decoder too


def test_one_image_moves_the_released_vector_by_at_most_the_clip(tmp_path: Path) -> None:
    """Each image's contribution to each release (the centre sums, the statistics of g, those of g − c), computed
    by the mode's pass and scaled as released, has L2 norm at most C (1 here); weighing each pixel 1 instead of
    1/pixels would break it (checked on the same features)."""
    base, train = _base(tmp_path, "fpn")
    net: Any = load_model(base, "cpu").eval()
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    features = sufficient.features_record("b" * 64, spec.arch, 128, P)
    bound = sufficient.clip_bound(128, P)
    proj = sufficient.projection(features["projection"]["seed"], 128, P)
    centre = sufficient.Centre(np.full(P, 0.5 * bound / math.sqrt(P)), 0.2 * bound)
    centre_scales = {"sum": math.sqrt(0.9) / bound, "count": math.sqrt(0.05), "square": math.sqrt(0.05) / bound**2}

    def released(stats: dict[str, np.ndarray], scales: dict[str, float]) -> float:
        return math.sqrt(sum(float(((stats[k] * scales[k]) ** 2).sum()) for k in scales))

    def one_image(i: int, part: Any) -> dict[str, np.ndarray]:
        return stats_head._one_pass(net, spec, train.subset([i]), False, torch.device("cpu"), 4, no_track, "t", part)

    for part, scales in [
            (lambda f, y, w: sufficient.contributions(f, y, w, 2, proj, bound), sufficient.release_scales(bound)),
            (lambda f, y, w: sufficient.contributions(f, y, w, 2, proj, bound, centre),
             sufficient.release_scales(centre.clip)),
            (lambda f, y, w: sufficient.centre_contributions(f, w, proj, bound), centre_scales)]:
        norms = [released(one_image(i, part), scales) for i in range(len(train))]
        assert max(norms) <= 1 + 1e-9 and max(norms) > 0.5
    feats, labels = _reference_pixels(base, train.subset([0]))
    unweighted = sufficient.contributions(feats, labels.tolist(), np.ones(len(labels)), 2, proj, bound)
    assert released(unweighted, sufficient.release_scales(bound)) > 100


def test_merged_pixel_head_is_the_pooled_data_head(tmp_path: Path) -> None:
    base, train = _base(tmp_path, "unet")
    parts = [list(range(0, 6)), list(range(6, 10))]
    vectors = []
    for j, idx in enumerate(parts):
        run = finetune(base, train.subset(idx), tmp_path / f"run{j}",
                       FinetuneConfig(train=f"stats-head:{P}", val_fraction=0.0, device="cpu", contributor=f"s{j}"))
        vectors.append(export_vector(run.model_path, base, tmp_path / f"v{j}.safetensors").path)
    merge_vectors(vectors, base, tmp_path / "m.safetensors", method="lda-head")
    feats, labels = _reference_pixels(base, train)
    record = read_kind(vectors[0], "vector").meta["sufficient"]
    proj = sufficient.projection(record["features"]["projection"]["seed"], feats.shape[1], P)
    weight, bias = lda_reference(feats, labels, 2, proj, sufficient.DEFAULT_SHRINK)
    got = load_file(str(tmp_path / "m.safetensors"))
    np.testing.assert_allclose(got[HEAD[0]].reshape(2, -1), weight, rtol=1e-3, atol=1e-4 * np.abs(weight).max())
    np.testing.assert_allclose(got[HEAD[1]], bias, rtol=1e-3, atol=1e-4)


def test_class_means_stays_classification_only(tmp_path: Path) -> None:
    base, train = _base(tmp_path, "unet")
    with pytest.raises(ConfigError, match="class-means is for classification"):
        finetune(base, train, tmp_path / "run", FinetuneConfig(train="class-means", val_fraction=0.0, device="cpu"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, says", [({"bias": False}, "Conv2d(16, 2"), ({"groups": 2}, "groups=2"),
                                          ({"padding_mode": "reflect"}, "padding_mode=reflect")])
def test_a_head_that_is_not_one_plain_convolution_is_refused(change: dict[str, Any], says: str) -> None:
    """The solve writes a linear map of unfolded features: a head without a bias, grouped or padded otherwise
    than with zeros is not one, and is refused."""
    net, spec = build_base("test_efficientnet", task="segmentation", num_classes=2, img_size=32, seed=0)
    old, dim = stats_head.head_layer(net, spec, "stats-head:4")  # smp's own head is solvable
    assert dim == old.in_channels * old.kernel_size[0] * old.kernel_size[1]
    args = {"kernel_size": old.kernel_size, "padding": old.padding, "bias": True, **change}
    net.segmentation_head[0] = torch.nn.Conv2d(old.in_channels, old.out_channels, **args)
    with pytest.raises(ConfigError, match="needs the segmentation head to be one plain convolution") as err:
        stats_head.head_layer(net, spec, "stats-head:4")
    assert says in str(err.value)
