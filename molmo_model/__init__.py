"""Molmo in PyTorch: config, model, preprocessor, points, tokenizer, checkpoints, vLLM adapter.

Submodules are imported on demand (`molmo_model.points` needs no torch model; the vLLM
adapter is loaded by vLLM's plugin system), so importing this package stays cheap.
"""

__version__ = "0.1.0"
