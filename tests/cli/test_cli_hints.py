"""Errors that say what to do: segmentation folders given to a classifier, a vector given to `evaluate`, and
`init --pretrained` without a reachable Hub (fails at once, pointing to `--weights`; the cache still serves)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_app import invoke
from synthetic_data import image_folder, seg_folder

from taskvec.merging.export import export_vector


@pytest.mark.parametrize("layout", ["challenge", "site-folders"])
def test_segmentation_folder_on_a_classification_base(layout: str, make_base, tmp_path: Path) -> None:
    """A challenge's train/{images,masks} beside test/images without masks (as ../shared/data/isbi2012_em), or
    one images/+masks/ folder per site (as wbc_2site): the error names the segmentation layout and the
    classifier, never a class called 'images' or a site."""
    base = make_base(num_classes=2)
    data = tmp_path / "data"
    if layout == "site-folders":
        for site in ("site_a", "site_b"):
            seg_folder(data / site, n=2)
    else:
        seg_folder(data / "train", n=2)
        seg_folder(data / "test", n=2)
        shutil.rmtree(data / "test" / "masks")
    code, _, err = invoke("finetune", "--base", base, "--data", data, "--out", tmp_path / "run", "--steps", "1",
                          "--device", "cpu")
    assert code != 0
    assert "a segmentation layout, but the base is a classifier" in err, err
    assert "is not one of the base's labels" not in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_evaluate_a_vector_says_merge_it_first(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base(num_classes=2)
    vec = tmp_path / "vec.safetensors"
    export_vector(make_finetuned(base, seed=1), base, vec, contributor="site0", samples=8)
    data = image_folder(tmp_path / "data", n_per_class=2, size=32)
    code, _, err = invoke("evaluate", vec, "--data", data, "--device", "cpu")
    assert code != 0
    assert "data vector" in err and f"taskvec merge {vec} --base BASE --out merged.safetensors" in err, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: a connection there is refused at once


def _init_offline(tmp_path: Path, hf_home: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(hf_home)}
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "taskvec", "init", "--arch", "test_vit", "--num-classes", "2",
                        "--pretrained", "--out", str(tmp_path / "out" / "base.safetensors")],
                       env=env, capture_output=True, text=True, timeout=300)
    return p, time.monotonic() - t0


def test_pretrained_without_hub_fails_fast_with_a_hint(tmp_path: Path) -> None:
    """huggingface_hub alone retries for about 53 s before its LocalEntryNotFoundError."""
    p, seconds = _init_offline(tmp_path, tmp_path / "hf-home")
    assert p.returncode == 2, p.stdout + p.stderr
    assert seconds < 25, seconds
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "--weights FILE" in lines[0] and "not reachable" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_pretrained_without_hub_reads_the_cache(tmp_path: Path) -> None:
    """Weights huggingface_hub has cached are used without the Hub, and just as fast."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    cached = timm.create_model("test_vit").state_dict()
    repo = tmp_path / "hf-home" / "hub" / "models--timm--test_vit.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(cached, str(repo / "snapshots" / commit / "model.safetensors"))
    p, seconds = _init_offline(tmp_path, tmp_path / "hf-home")
    assert p.returncode == 0, p.stdout + p.stderr
    assert seconds < 25, seconds
    made = load_file(str(tmp_path / "out" / "base.safetensors"))
    assert torch.equal(made["patch_embed.proj.weight"], cached["patch_embed.proj.weight"])
