"""Training: source models for banks (and, later, the paper's multi-task soft orders)."""

from __future__ import annotations

from ._supervised import FitConfig, accuracy, fit_classifier

__all__ = ["FitConfig", "accuracy", "fit_classifier"]
