"""Subcommands that live outside cli.py: each module adds its parsers and sets ``handler`` on them."""
