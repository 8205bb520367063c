"""Reading a training checkpoint (`runs/<run>/checkpoints/step-N`) for the demo diagnostics.

`load_for_diagnosis(checkpoint)` gives the model in eval mode, its tokenizer, the run's
TrainConfig and, when the run trained with `run.dense_loss`, the dense head with a tap on the
vision backbone's output (else None, None): what `count_errors.py` and `demo_ablation.py`
read teacher-forced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_for_diagnosis(checkpoint: Path) -> tuple[Any, Any, Any, Any, Any]:
    """(model, tokenizer, train config, dense head or None, its feature tap or None)."""
    import torch

    from molmo_model.checkpoint import load_checkpoint
    from training.config import TrainConfig
    from training.extras.dense import DenseHead, FeatureTap

    model, _, tok = load_checkpoint(checkpoint)
    model.eval()
    cfg = TrainConfig.from_dict(json.loads((checkpoint / "train_config.json").read_text()))
    scene = cfg.data.synthetic().scene
    state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False)
    if "dense_head" not in state:
        return model, tok, cfg, None, None
    head = DenseHead(model.config.llm.hidden_size, len(scene.kinds), len(scene.colours))
    head.load_state_dict(state["dense_head"])
    return model, tok, cfg, head, FeatureTap(model.model.vision_backbone)
