"""MkDocs hooks: the command-line reference from the typer app, and the benchmark figures in the site.

- `<!-- taskvec-cli-reference -->` in a page becomes every command's usage, arguments and options, written by
  typer's own documentation generator from `taskvec.cli.app` (so the page cannot drift from `--help`);
- the figures the benchmarks write under `benchmarks/results/` are served as `results/figures/...`.
"""

from __future__ import annotations

from pathlib import Path

import typer
import typer.cli
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "benchmarks" / "results"
CLI_MARKER = "<!-- taskvec-cli-reference -->"


def cli_reference() -> str:
    """Markdown for `taskvec` and every subcommand, headings from level 2."""
    from taskvec.cli.app import app

    command = typer.main.get_command(app)
    text = typer.cli.get_docs_for_click(obj=command, ctx=typer.Context(command), name="taskvec")
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())  # under the page's h1


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    return markdown.replace(CLI_MARKER, cli_reference()) if CLI_MARKER in markdown else markdown


def on_files(files: Files, config) -> Files:  # noqa: ANN001
    for path in sorted(FIGURES.rglob("*.png")):
        uri = "results/figures/" + path.relative_to(FIGURES).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
