"""Training Molmo with the paper's recipe, and evaluating what it learned.

    config.py         TrainConfig: one dataclass per section (model, data, optim, run, extras), presets
    train.py          the run: `setup`, the loop, the wall-time limit, the final export
    step.py           one optimizer step: `train_step` -> `forward_backward_step`
    checkpointing.py  resumable checkpoints (served layout + training_state.pt)
    run_log.py        log.jsonl rows, loss.png, the quick held-out evaluation
    distributed.py    torchrun's process group and sums across it
    recipe.py         per-component AdamW, warmup + cosine, clipping, fresh-weight init
    loader.py         step -> this rank's micro-batches, a pure function of the step
    packing.py        multi-annotation packing and batching
    coordinates.py    where an answer's point coordinates sit among its tokens
    supervision.py    the interface of optional extra supervision (`Extra`, `ExtraLoss`)
    extras/           the synthetic demo's extras: dense image-token loss, grounding, recovery
    data/             the record type, the JSONL format and its up-front check, the synthetic generators
    evaluate.py       pointing, counting and clock accuracy through an engine
    evaluate_data.py  pointing, counting and exact match on your own JSONL data (`molmo eval --data`)
    cli.py            `molmo train`, `molmo eval`
"""
