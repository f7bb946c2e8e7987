"""`python -m collection`: the `collection` command, for when its script is not on PATH."""

from .cli import cli

cli(prog_name="collection")
