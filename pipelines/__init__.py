"""Bundled pipeline configs (installed as the ``distill2deploy.pipelines`` package)."""
