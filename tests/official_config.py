"""The exact fields of Ai2's Molmo-7B-D-0924 config.json (no vision fields), shared by tests."""

OFFICIAL_FIELDS = {
    "architectures": ["MolmoForCausalLM"],
    "attention_layer_norm": False,
    "auto_map": {
        "AutoConfig": "config_molmo.MolmoConfig",
        "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM",
    },
    "clip_qkv": None,
    "embedding_size": 152064,
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 37888,
    "layer_norm_eps": 1e-06,
    "layer_norm_type": "rms",
    "max_position_embeddings": 4096,
    "model_type": "molmo",
    "norm_after": False,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "qkv_bias": True,
    "rope_theta": 1000000.0,
    "torch_dtype": "float32",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "use_position_ids": True,
    "vocab_size": 152064,
    "weight_tying": False,
}

# Fields that name Ai2's remote code and tooling; our own configs leave them out.
REMOTE_CODE_FIELDS = ("auto_map", "transformers_version")
