"""allo-train: the ALLO pipeline (prepare, warmup, select, forget, improve, eval) on a thin
accelerate training loop. CLI: ``allo-train --help``; Python: :func:`allo.train.pipeline.run`."""

from .config import STAGES, TrainConfig

__all__ = ["TrainConfig", "STAGES", "run"]


def run(config, **kwargs):
    """Shortcut for :func:`allo.train.pipeline.run`."""
    from .pipeline import run as _run

    return _run(config, **kwargs)
