"""A published model's card says which library loads it, for each task (as `publish_model` writes its config)."""

from __future__ import annotations

import pytest
import yaml

from taskvec.io.schema import ModelHeader
from taskvec.registry.card import render_model_card


@pytest.mark.parametrize(("task", "library", "pipeline", "loader"), [
    ("classification", "timm", "image-classification",
     "model = timm.create_model('hf-hub:org/model', pretrained=True)"),
    ("segmentation", "segmentation-models-pytorch", "image-segmentation",
     "model = smp.from_pretrained('org/model')"),
])
def test_model_card_names_the_library_that_loads_the_model(task: str, library: str, pipeline: str,
                                                           loader: str) -> None:
    m = ModelHeader(identity="ab" * 32, model={"arch": "tf_efficientnet_lite0", "task": task, "labels": ["a", "b"]})
    card = render_model_card(m, "org/model", {"license": "apache-2.0"}, "v3")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == library and meta["pipeline_tag"] == pipeline
    assert set(meta["tags"]) == {"taskvec", "merged"} and meta["license"] == "apache-2.0"
    assert loader in card and ("timm" in card) == (task == "classification")
    assert f"Model identity `{'ab' * 32}`" in card and "(v3)" in card
