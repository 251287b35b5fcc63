"""CLI subcommands that live outside cli.py: each module adds its parsers and handlers."""
