"""The folder backend: concurrent pushes from several processes, fast torch-free `push`/`list`, pull, addresses."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from registry_fixtures import created, sites  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.io.files import read_kind
from taskvec.registry import RegistryError, open_registry
from taskvec.registry.verify import sha256_file

pytest.importorskip("torch")


def test_concurrent_pushes_from_processes_lose_nothing(sites, tmp_path: Path) -> None:
    base, vector = sites
    address = str(tmp_path / "reg")
    created(address, base)
    vecs = [vector(i) for i in range(6)]
    jobs = [*vecs, vecs[0], vecs[3]]  # two duplicates racing with the originals
    procs = [
        subprocess.Popen([sys.executable, "-m", "taskvec.cli.app", "push", str(v), "--registry", address],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for v in jobs
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    entries = open_registry(address).entries()
    assert sorted(e.sha256 for e in entries) == sorted(read_kind(v, "vector").meta["sha256"] for v in vecs)
    for e in entries:
        assert sha256_file(tmp_path / "reg" / e.path) == e.file_sha256
    leftovers = [p for p in (tmp_path / "reg").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_push_and_list_do_not_import_torch(sites, tmp_path: Path) -> None:
    base, vector = sites
    address = str(tmp_path / "reg")
    created(address, base)
    code = (
        "import sys, json; from taskvec.cli.app import app\n"
        "app(['push', sys.argv[1], '--registry', sys.argv[2]], standalone_mode=False)\n"
        "app(['list', '--registry', sys.argv[2]], standalone_mode=False)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'timm') if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(vector(0)), address],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "site0" in proc.stdout and json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_pull_copies_verified_files_once(sites, tmp_path: Path) -> None:
    base, vector = sites
    address = str(tmp_path / "reg")
    reg = created(address, base)
    for i in range(3):
        reg.push(vector(i))
    out = tmp_path / "pulled" / "new"  # created by pull
    runner = CliRunner()
    res = runner.invoke(app, ["pull", "--registry", address, "--out", str(out), "--only-contributor", "site1",
                              "--allow-unsigned"])
    assert res.exit_code == 0, res.output
    files = sorted(out.iterdir())
    assert len(files) == 1 and files[0].read_bytes() == vector(1).read_bytes()
    res = runner.invoke(app, ["pull", "--registry", address, "--out", str(out), "--allow-unsigned"])
    assert res.exit_code == 0 and "2 new, 1 already there" in res.output
    assert sorted(p.read_bytes() for p in out.iterdir()) == sorted(vector(i).read_bytes() for i in range(3))


@pytest.mark.parametrize("address, message", [
    ("s3://bucket/reg", "unknown registry scheme"),
    ("file://relative/path", "absolute path"),
    ("hf://just-a-name", "hf://ORG/REPO"),
])
def test_bad_addresses(address: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        open_registry(address)


def test_file_url_and_missing_folder(sites, tmp_path: Path) -> None:
    base, vector = sites
    with pytest.raises(RegistryError, match="no such registry"):
        open_registry(f"file://{tmp_path}/absent").entries()
    (tmp_path / "plain").mkdir()
    with pytest.raises(RegistryError, match="not a taskvec registry"):
        open_registry(str(tmp_path / "plain")).push(vector(0))
    reg = created(f"file://{tmp_path}/reg", base)
    assert reg.push(vector(0)).added and (tmp_path / "reg" / "index.json").is_file()
    (tmp_path / "file").write_text("x")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    for name in ("file", "broken"):
        for use in (lambda r: r.entries(), lambda r: r.create(base)):  # not `registry init FILE` as the remedy
            with pytest.raises(RegistryError, match="a file or a broken link, not a registry folder"):
                use(open_registry(str(tmp_path / name)))
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("found", ["README.md", "index.json"])
def test_init_never_overwrites_files_that_are_not_a_registry(found: str, sites, tmp_path: Path) -> None:
    """A project folder's README, or the index of a registry that lost registry.json, is refused, not replaced."""
    base, _ = sites
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / found).write_text("mine\n")
    r = CliRunner().invoke(app, ["registry", "init", str(folder), "--base", str(base)])
    assert isinstance(r.exception, RegistryError) and f"holds {found} but no registry.json" in str(r.exception)
    assert [p.name for p in folder.iterdir() if p.name != ".taskvec.lock"] == [found]  # the store's lock stays
    assert (folder / found).read_text() == "mine\n"
