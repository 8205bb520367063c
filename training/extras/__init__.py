"""The synthetic demo's extra supervision, each an `Extra` (training/supervision.py).

    dense.py      a per-token loss on the image features: kind, colour, centre of the object
                  under each token (a stand-in for a pre-trained vision tower)
    grounding.py  attention grounding: the positions that write a coordinate look at its object
    recovery.py   order recovery: answers that go back for an object passed by a slip

They train the demo model from nothing in minutes; a run on real data with a pre-trained
tower needs none of them. Each has its own table in the `[extras]` section of a run's config;
all are off by default:

    [extras.dense]
    weight = 1.0
    object_attributes = 1.0
    [extras.grounding]
    weight = 1.0
    layers = [-2, -1]
    lead = true
    [extras.recovery]
    prob = 0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from molmo_model.preprocessing import MolmoPreprocessor
from training.extras.dense import DenseConfig, DenseExtra, object_vocabulary
from training.extras.grounding import GroundingConfig, GroundingExtra
from training.extras.recovery import RecoveryConfig, RecoveryExtra
from training.supervision import Extra

if TYPE_CHECKING:
    from training.config import DataConfig  # the root config imports this module, not back


@dataclass
class ExtrasConfig:
    """`[extras]`: one table per extra."""

    dense: DenseConfig = field(default_factory=DenseConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def build(self, data: DataConfig, preprocessor: MolmoPreprocessor) -> list[Extra]:
        """The extras switched on, in the order their losses add up (dense, then grounding)."""
        extras: list[Extra] = []
        if self.dense.weight > 0:
            kinds, colours = object_vocabulary(data)
            extras.append(DenseExtra(self.dense, preprocessor.config, kinds, colours))
        if self.grounding.weight > 0:
            extras.append(GroundingExtra(self.grounding, preprocessor.config, preprocessor.tokenizer))
        if self.recovery.prob > 0:
            extras.append(RecoveryExtra(self.recovery))
        return extras
