"""The import direction of the code base, read from the source (every import, lazy ones included):
I/O at the bottom, simulation at the top of the library; the library never imports the CLI or the registry;
registry backends import the registry core, never the reverse; no import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"taskvec": "taskvec", "registry": "taskvec.registry", "cli": "taskvec.cli"}

# Lower layers never import higher ones. Modules directly under taskvec/ sit at the bottom, except
# taskvec/__main__.py (`python -m taskvec`), which only runs the CLI: it sits on top.
LAYERS = ["taskvec", "taskvec.io", "taskvec.models", "taskvec.privacy", "taskvec.training", "taskvec.merging",
          "taskvec.audits", "taskvec.simulation", "taskvec.registry", "taskvec.cli", "taskvec.__main__"]
# Inside the registry: signing and the card under the records, the store interface and checks, the `Registry`
# over them, then merge selection and the backends (`stores/`), then the address lookup and publishing.
REGISTRY_LAYERS = {
    "signing": 0, "card": 0, "trust": 1, "schema": 2, "store": 3, "verify": 3, "registry": 4, "selection": 5,
    "stores": 5, "address": 6, "publish": 6, "__init__": 7,  # "stores": every backend under registry/stores/
}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The taskvec modules `path` imports, resolved to modules (`from taskvec.io import files` is the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("taskvec")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("taskvec"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def test_the_scan_sees_every_package() -> None:
    g = graph()
    assert len(g) > 40
    for prefix in LAYERS:
        assert any(m == prefix or m.startswith(prefix + ".") for m in g), prefix
    assert "taskvec.privacy.ledger" in g["taskvec.merging.export"]


def test_imports_go_down_the_layers() -> None:
    wrong = [f"{m} imports {t}" for m, targets in graph().items() for t in targets
             if t != "taskvec" and layer(t) > layer(m)]
    assert not wrong, "\n".join(wrong)


def test_registry_core_does_not_import_its_backends() -> None:
    def rank(m: str) -> int:
        name = m.removeprefix("taskvec.registry").lstrip(".") or "__init__"
        return REGISTRY_LAYERS["stores" if name.startswith("stores.") else name]

    g = graph()
    wrong = [f"{m} imports {t}" for m, targets in g.items() if m.startswith("taskvec.registry")
             for t in targets if t.startswith("taskvec.registry") and rank(t) >= rank(m) and t != m]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if t == m or t == "taskvec":
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t):], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def _string_literals(path: Path) -> set[str]:
    """The values of the plain string literals in a module (docstrings and f-strings included as written)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.add(node.value)
    return out


def test_no_module_names_a_mode_or_mechanism_outside_its_own_file() -> None:
    """A training mode or privacy mechanism is one registered module: no other module compares against its
    name (a string if-chain over names is what the registries replace). Prose may mention it."""
    import inspect

    from taskvec.privacy.mechanism import mechanisms
    from taskvec.training.modes import registered

    owners = {m.name: Path(inspect.getsourcefile(m)) for m in registered()}  # type: ignore[arg-type]
    owners |= {name: Path(inspect.getsourcefile(type(m))) for name, m in mechanisms().items()}  # type: ignore[arg-type]
    generic = {"all", "head"}  # also the names of a split and of an option: too common to police
    registries = {"taskvec.training.modes.base", "taskvec.privacy.mechanism"}  # may name a format field ("lora")
    found = []
    for module, path in modules().items():
        if module in registries:
            continue
        literals = _string_literals(path)
        found += [f"{module}: {name!r}" for name, owner in owners.items()
                  if name not in generic and name in literals and path.resolve() != owner.resolve()]
    assert not found, found


def test_every_package_is_installed() -> None:
    """pyproject.toml lists packages by hand (cli/ and registry/ map into taskvec): a new subpackage missing
    there would be left out of a wheel while an editable install hides it."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module for module, path in modules().items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)
