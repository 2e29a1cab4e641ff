"""The `taskvec` command line (typer + rich). Each command is one call into the `taskvec` library."""
