"""Molmo 2 (Ai2, Dec 2025): SigLIP 2 so400m/14 vision tower, attention pooling, SwiGLU
connector and a Qwen3 (Molmo2-4B, -8B) or OLMo 3 (Molmo2-O-7B) decoder, beside Molmo
(molmo_model/model.py) and built from its modules.

    config.py   Molmo2Config <-> Ai2's config.json; presets molmo2-4b, molmo2-8b, molmo2-tiny
    vision.py   the vision backbone over the processor's crops and token pooling indices
    model.py    Molmo2ForConditionalGeneration (logits, KV cache) and greedy/sampled generate
    preprocessing.py  Ai2's image and video processors and chat layout: crops, frames, pooling
                      indices, prompt ids

Checkpoints load through molmo_model.checkpoint.load_checkpoint, which reads the family from
config.json.
"""
