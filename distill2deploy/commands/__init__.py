"""Subcommands that live in their own module: each exposes ``add_parser(sub)`` and sets ``handler``."""
