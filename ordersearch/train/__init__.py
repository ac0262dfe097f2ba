"""Training: source models for banks, and banks trained the paper's way.

``train_bank`` implements the multi-task soft orders of Zhmoginov, Bashkirova and Sandler,
"Compositional Models: Multi-Task Learning and Knowledge Transfer with Modular Networks"
(arXiv 2107.10963): K shared isometric blocks, per-task soft orders annealed into hard ones,
per-position normalisation statistics, and transfer by fine-tuning an order from a spec.
"""

from __future__ import annotations

from ._config import TaskSpec, TrainConfig, load_train_config
from ._finetune import FinetuneResult, finetune_order
from ._mixing import (
    Mixing,
    OutputMixing,
    TemperatureSchedule,
    WeightMixing,
    entropy,
    harden,
    mixing_weights,
    top_weight,
)
from ._multitask import SoftOrderModel, TrainResult, recalibrate, train_bank
from ._outputs import plot_mixing, plot_mixing_strip
from ._supervised import FitConfig, accuracy, fit_classifier

__all__ = [
    "FinetuneResult",
    "FitConfig",
    "Mixing",
    "OutputMixing",
    "SoftOrderModel",
    "TaskSpec",
    "TemperatureSchedule",
    "TrainConfig",
    "TrainResult",
    "WeightMixing",
    "accuracy",
    "entropy",
    "finetune_order",
    "fit_classifier",
    "harden",
    "load_train_config",
    "mixing_weights",
    "plot_mixing",
    "plot_mixing_strip",
    "recalibrate",
    "top_weight",
    "train_bank",
]
