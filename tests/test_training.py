"""Training: multi-annotation packing, the recipe, exact resume, DDP, and the eval metrics.

Everything runs on the CPU with the `tiny` model (max_crops 1: 2 crops per image) and real
synthetic scenes. The packing tests run the model in float64 (the model sums the token losses
in float32, hence the 1e-6 tolerance); the 2-process test uses torch.multiprocessing with gloo.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import free_port

from kernels import annotation_mask
from molmo_model.checkpoint import load_checkpoint
from molmo_model.config import tiny
from molmo_model.model import MolmoForCausalLM
from molmo_model.points import format_points
from molmo_model.preprocessing import MolmoPreprocessor
from molmo_model.tokenizer import build_tokenizer
from training.checkpointing import STATE_FILE
from training.config import DEMO_SCENE, DataConfig, ModelSpec, RunConfig, TrainConfig, run_preset
from training.data.records import Annotation, Example, inside
from training.data.synthetic import SceneConfig, SyntheticConfig, make_example
from training.evaluate import Query, match_points, parse_count, parse_time, point_scores, score
from training.extras import ExtrasConfig
from training.extras.dense import DenseConfig
from training.extras.grounding import GroundingConfig
from training.extras.recovery import RecoveryConfig, RecoveryExtra
from training.loader import StepBatches
from training.packing import IGNORE, collate, pack_example, pack_tokens, split_annotations
from training.recipe import (
    COMPONENTS,
    OptimConfig,
    build_optimizer,
    clip_grad_norms,
    component_of,
    init_from_scratch,
    lr_factor,
)
from training.train import train

SCENES = SyntheticConfig(scene=SceneConfig(**DEMO_SCENE), clock_fraction=0.0)


@pytest.fixture(scope="module")
def config(tok):
    cfg = tiny(vocab_size=tok.embedding_size)
    cfg.preprocess.max_crops = 1
    return cfg


@pytest.fixture(scope="module")
def pre(tok, config):
    return MolmoPreprocessor(config.preprocess, tok)


@pytest.fixture(scope="module")
def model64(config, tok):
    torch.manual_seed(0)
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id)
    return init_from_scratch(model, seed=0).double().eval()


def _example(first: int = 0) -> Example:
    """The first training scene from index `first` on with at least 3 annotations."""
    for index in range(first, first + 50):
        ex = make_example("train", index, SCENES)
        if len(ex.annotations) >= 3:
            return ex
    raise AssertionError("no scene with 3 annotations")


def _loss_sum(model: MolmoForCausalLM, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch.model_inputs(), loss_normalizer=1.0)
    return out.loss


def _tokens_per_crop(config) -> int:
    return config.preprocess.tokens_per_side**2


# ---------------------------------------------------------------- packing


def test_packing_gives_the_loss_of_the_annotations_trained_one_by_one(model64, pre, config):
    ex = _example()
    image = pre.preprocess(ex.image)
    image.images = image.images.double()
    packed = pack_example(ex, pre, image=image)
    assert packed.n_annotations == len(ex.annotations) and packed.n_dropped == 0
    t = _tokens_per_crop(config)
    total = _loss_sum(model64, collate([packed], pre.tokenizer.pad_id, t))
    singles = [pack_example(e, pre, image=image) for e in split_annotations(ex)]
    assert sum(s.n_loss_tokens for s in singles) == packed.n_loss_tokens
    one_by_one = sum(_loss_sum(model64, collate([s], pre.tokenizer.pad_id, t)) for s in singles)
    assert torch.allclose(total, one_by_one, rtol=1e-6, atol=1e-6), (float(total), float(one_by_one))
    # The singles batched together (right padding, crops concatenated) give the same sum.
    batched = _loss_sum(model64, collate(singles, pre.tokenizer.pad_id, t))
    assert torch.allclose(batched, one_by_one, rtol=1e-6, atol=1e-6)


def test_packed_layout_positions_labels_and_segments(pre):
    ex = _example()
    packed = pack_example(ex, pre)
    p = 1 + len(pre.preprocess(ex.image).tokens)  # BOS + image tokens
    seg, pos, ids, labels = packed.segment_ids, packed.position_ids, packed.input_ids, packed.labels
    assert (seg[:p] == 0).all() and (pos[:p] == torch.arange(p)).all()
    assert (labels[:p] == IGNORE).all()
    eos = pre.tokenizer.eos_id
    for k in range(1, packed.n_annotations + 1):
        where = (seg == k).nonzero().flatten()
        assert (pos[where] == torch.arange(p, p + len(where))).all()  # positions restart
        answer = ex.annotations[k - 1].answer
        # The labelled targets of annotation k are its answer tokens + EOS.
        targets = labels[where][labels[where] != IGNORE].tolist()
        assert targets[-1] == eos
        assert pre.tokenizer.decode(targets[:-1]) == " " + answer
        assert ids[where[-1]] == eos
        assert labels[where[-1]] == IGNORE  # the last token predicts nothing across annotations


def test_attention_mask_follows_the_papers_rule(pre, config):
    examples = [pack_example(_example(0), pre), pack_example(_example(20), pre)]
    batch = collate(examples, pre.tokenizer.pad_id, _tokens_per_crop(config))
    mask = annotation_mask(batch.segment_ids)  # [B, S, S]
    for b, packed in enumerate(examples):
        # The paper's rule from the layout alone: a token of annotation k sees the image
        # prefix and the tokens of annotation k up to itself; a prefix token sees the prefix
        # up to itself; nothing sees padding or another annotation.
        seg = packed.segment_ids.tolist()
        prefix = seg.count(0)
        span = {k: (seg.index(k), len(seg) - seg[::-1].index(k)) for k in set(seg) - {0}}
        for i in range(packed.length):
            if seg[i] == 0:
                expected = set(range(i + 1))
            else:
                start, _ = span[seg[i]]
                expected = set(range(prefix)) | set(range(start, i + 1))
            assert set(mask[b, i].nonzero().flatten().tolist()) == expected, (b, i)


def test_truncation_drops_whole_annotations_and_keeps_at_least_one():
    prefix = [7] * 10
    ann = [([1, 2, 3, 4], [False, True, True, True]), ([5] * 30, [False] + [True] * 29), ([6, 6], [False, True])]
    tensors, kept, dropped = pack_tokens(prefix, ann, max_len=17)
    assert (kept, dropped) == ([0, 2], 1)  # the 30-token annotation is dropped, the last one fits
    assert tensors["segment_ids"].tolist() == [0] * 10 + [1] * 4 + [2] * 2
    tensors, kept, dropped = pack_tokens(prefix, [ann[1], ann[0]], max_len=15)
    assert (kept, dropped) == ([0], 1)  # the first annotation is cut to fit
    assert len(tensors["input_ids"]) == 15
    assert tensors["labels"][-1] == IGNORE  # its next token was cut away
    with pytest.raises(ValueError, match="max_len"):
        pack_tokens(prefix, ann, max_len=11)


# ---------------------------------------------------------------- recipe


def test_parameter_groups_cover_the_three_components(config, tok):
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id)
    names = dict(model.named_parameters())
    assert component_of("model.vision_backbone.image_vit.pre_ln.weight") == "vit"
    assert component_of("model.vision_backbone.image_pooling_2d.wq.weight") == "connector"
    assert component_of("model.vision_backbone.image_projector.w2.weight") == "connector"
    assert component_of("model.vision_backbone.pad_embed") == "connector"
    assert component_of("model.transformer.blocks.0.att_proj.weight") == "llm"
    opt_cfg = OptimConfig(connector_lr=1e-3, vit_lr=2e-4, llm_lr=5e-4, connector_warmup=2, vit_warmup=4, llm_warmup=4)
    optimizer, scheduler = build_optimizer(model, opt_cfg, total_steps=20)
    groups = {g["component"]: g for g in optimizer.param_groups}
    assert set(groups) == set(COMPONENTS)
    assert sum(len(g["params"]) for g in groups.values()) == len(names)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-6
    # Step 0: warmup from 1/warmup of each peak.
    assert groups["connector"]["lr"] == pytest.approx(1e-3 / 2)
    assert groups["vit"]["lr"] == pytest.approx(2e-4 / 4)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    # The cosine ends at 10% of each peak.
    assert groups["llm"]["lr"] == pytest.approx(5e-5)
    assert groups["connector"]["lr"] == pytest.approx(1e-4)


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_gradients_are_clipped_per_component(config, tok):
    model = MolmoForCausalLM(config, im_patch_id=tok.im_patch_id)
    optimizer, _ = build_optimizer(model, OptimConfig(), total_steps=10)
    for name, p in model.named_parameters():
        big = component_of(name) == "llm"
        p.grad = torch.full_like(p, 10.0 if big else 1e-4)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    norms = clip_grad_norms(optimizer, 1.0)
    assert norms["llm"] > 1.0 and norms["vit"] < 1.0 and norms["connector"] < 1.0
    for name, p in model.named_parameters():
        if component_of(name) == "llm":
            assert not torch.equal(p.grad, before[name])
        else:  # a huge LLM gradient does not shrink the small vision gradients
            assert torch.equal(p.grad, before[name])
    llm = [p.grad for n, p in model.named_parameters() if component_of(n) == "llm"]
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in llm)) == pytest.approx(1.0, rel=1e-4)


def test_scaled_init_lets_image_features_reach_the_llm(config, tok):
    model = init_from_scratch(MolmoForCausalLM(config, im_patch_id=tok.im_patch_id), seed=0)
    images = torch.randn(2, config.preprocess.num_patches, config.preprocess.patch_pixels)
    feats = model.model.vision_backbone(images, torch.ones(2, config.preprocess.num_patches))
    emb = model.model.transformer.wte.embedding
    assert feats.std() > 10 * emb.std()  # the image, not the <im_patch> embedding, dominates


# ---------------------------------------------------------------- the loop


def _run_config(out: Path, steps: int, batch_size: int = 2, dense: float = 0.0, grounding: float = 0.0,
                **run) -> TrainConfig:  # fmt: skip
    return TrainConfig(
        model=ModelSpec(preset="tiny", max_crops=1),
        data=DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=batch_size, max_len=700),
        optim=OptimConfig(connector_lr=2e-3, vit_lr=2e-3, llm_lr=2e-3, connector_warmup=1, vit_warmup=1, llm_warmup=1),
        run=RunConfig(out_dir=str(out), steps=steps, log_every=1, progress=False, **run),
        extras=ExtrasConfig(dense=DenseConfig(weight=dense), grounding=GroundingConfig(weight=grounding)),
    )


class FakeTime:
    """Wall time for the trainer (`now`) that moves `tick` seconds each time it is read, however long
    the work between two readings really takes: the time limit falls at the same step on any
    machine."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_checkpoint(folder, with_tokenizer=False)
    return model.state_dict()


def test_few_steps_lower_the_loss(tmp_path):
    cfg = _run_config(tmp_path, steps=8)
    cfg.data.size = 2  # the same two images again and again
    final = train(cfg)
    losses = _losses(tmp_path)
    assert losses[8] < 0.7 * losses[1], losses
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((final / "train_config.json").read_text())["run"]["steps"] == 8


def test_time_limit_stops_with_a_resumable_checkpoint(tmp_path):
    final = train(_run_config(tmp_path, steps=50, time_limit_s=1e-3), now=FakeTime(1.0))
    assert (tmp_path / "checkpoints" / "step-000001" / STATE_FILE).exists()
    assert (final / "model.safetensors").exists()


def test_a_run_stopped_by_its_time_limit_logs_its_last_step(tmp_path):
    # Stopped at step 1, long before its first log row would be due: the step is still logged,
    # and the loss curve is drawn from it.
    cfg = _run_config(tmp_path, steps=50, time_limit_s=1e-3)
    cfg.run.log_every = 1000
    final = train(cfg, now=FakeTime(1.0))
    assert [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [1]
    assert (final / "loss.png").stat().st_size > 0


def test_demo_gpu_preset_is_the_demo_recipe_on_a_gpu():
    cpu, gpu = run_preset("demo"), run_preset("demo-gpu")
    assert gpu.model == cpu.model and gpu.optim == cpu.optim  # the same model and optimiser
    assert gpu.extras == cpu.extras and gpu.extras.dense.weight > 0  # and the same extras
    assert gpu.data.scene == cpu.data.scene
    assert gpu.data.max_len == cpu.data.max_len and gpu.data.clock_fraction == cpu.data.clock_fraction
    for name in ("response_dropout", "seed", "schedule_by_time", "export_dir"):
        assert getattr(gpu.run, name) == getattr(cpu.run, name), name
    assert gpu.run.device == "cuda" and gpu.data.batch_size == 2 * cpu.data.batch_size
    assert 0 < gpu.run.time_limit_s <= 15 * 60  # inside a lent GPU's 15 minutes


def test_schedule_by_time_ends_the_decay_at_the_time_limit(tmp_path):
    cfg = _run_config(tmp_path, steps=10_000, time_limit_s=5.0, schedule_by_time=True)
    train(cfg, now=FakeTime(1.0))  # two readings, 2 s, a step: past the limit at step 3
    (checkpoint,) = sorted((tmp_path / "checkpoints").glob("step-*"))[-1:]
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    assert state["step"] < 10_000  # stopped by the clock, far from the planned steps...
    assert state["scheduler"]["last_epoch"] == 10_000  # ...with the schedule at its end
    for group in state["optimizer"]["param_groups"]:
        assert group["lr"] == pytest.approx(group["initial_lr"] * cfg.optim.final_lr_fraction)


def test_schedule_by_time_keeps_the_warmup_by_steps(tmp_path):
    # A far-off step count and a short limit: wall time alone would jump the schedule past a
    # 3-step warmup at once; the warmup still runs step by step, wall time takes over after it.
    # The injected clock moves 0.5 s per reading (two a step: 1 s), so the 5.5 s limit ends the
    # run at step 6 however slow the machine.
    cfg = _run_config(tmp_path, steps=100_000, batch_size=1, time_limit_s=5.5, schedule_by_time=True)
    cfg.optim = dataclasses.replace(cfg.optim, connector_warmup=3, vit_warmup=3, llm_warmup=3)
    train(cfg, now=FakeTime(0.5))
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    peak = cfg.optim.llm_lr
    # lr_* is the rate the step trained with: 1/3, 2/3, 3/3 of the peak over the warmup...
    assert [r["lr_llm"] for r in rows[:3]] == pytest.approx([peak / 3, 2 * peak / 3, peak])
    # ...then wall time moves the schedule: after step 4, 1 s of the 2.5 s left when it took
    # over (at step 3, 3 s in) has passed, so step 5 trains 40% of the way along the steps left.
    position = int(3 + (4 - 3) / (5.5 - 3) * (100_000 - 3))
    assert rows[4]["lr_llm"] == pytest.approx(peak * lr_factor(position, 3, 100_000, cfg.optim.final_lr_fraction))
    assert peak * cfg.optim.final_lr_fraction < rows[4]["lr_llm"] < peak
    # ...and by the limit it has run the schedule to its end.
    (checkpoint,) = sorted((tmp_path / "checkpoints").glob("step-*"))[-1:]
    assert torch.load(checkpoint / STATE_FILE, weights_only=False)["scheduler"]["last_epoch"] == 100_000


def test_schedule_position_by_time_maps_the_time_left_onto_the_steps_left():
    from training.train import schedule_position_by_time

    assert schedule_position_by_time((30, 10.0), 10.0, 110.0, 1030) == pytest.approx(30)
    assert schedule_position_by_time((30, 10.0), 60.0, 110.0, 1030) == pytest.approx(530)
    assert schedule_position_by_time((30, 10.0), 110.0, 110.0, 1030) == pytest.approx(1030)
    assert schedule_position_by_time((30, 200.0), 200.0, 110.0, 1030) == 1030  # warmup outlasted the limit


@pytest.mark.parametrize("dense_loss", [0.0, 0.5], ids=["text-loss", "with-dense-and-grounding"])
def test_resume_matches_an_uninterrupted_run(tmp_path, dense_loss):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Response dropout draws from the RNG, so the restored RNG state matters too; with the
    # dense loss its training-only head must come back from the checkpoint as well.
    run = dict(response_dropout=0.1, dense=dense_loss, grounding=dense_loss)
    train(_run_config(straight, steps=4, **run))
    train(_run_config(resumed, steps=4, save_every=2, **run))
    # Simulate a crash after step 2: drop everything written after its checkpoint.
    import shutil

    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "model")
    assert (resumed / "checkpoints" / "step-000002" / STATE_FILE).exists()
    train(_run_config(resumed, steps=4, save_every=2, **run))
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7)
    if dense_loss:
        rows = [json.loads(r) for r in (resumed / "log.jsonl").read_text().splitlines()]
        assert all(r["dense_loss"] > 0 and r["grounding_loss"] > 0 for r in rows)
    wa, wb = _weights(straight / "model"), _weights(resumed / "model")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-7)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    train(_run_config(Path(out), steps=2, batch_size=1, device="cpu", dense=0.5, grounding=0.5))


def test_two_process_gloo_run_equals_one_process_run(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # The same global batch: 2 images in one process, or 1 image in each of 2 processes. The
    # dense and grounding losses are on: the dense head (outside DDP) must be averaged across
    # processes too, and both normalised by their counts over all processes.
    train(_run_config(one, steps=2, batch_size=2, device="cpu", dense=0.5, grounding=0.5))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(two)), nprocs=2, join=True)
    a, b = _losses(one), _losses(two)
    for step in (1, 2):
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    wa, wb = _weights(one / "model"), _weights(two / "model")
    for name in wa:
        # gloo sums in another order than one process does; Adam turns ~1e-9 gradient noise
        # on near-zero parameters into ~1e-6 weight differences after two steps.
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_step_batches_split_the_global_batch_between_ranks(pre, config):
    cfg = DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=2, grad_accum=2)
    t = _tokens_per_crop(config)
    ranks = [StepBatches(cfg, pre, t, rank=r, world_size=2, end_step=5) for r in range(2)]
    positions = [p for r in ranks for micro in r.step_positions(3) for p in micro]
    assert positions == list(range(3 * 8, 4 * 8))  # step 3 of a global batch of 8


# ---------------------------------------------------------------- eval metrics


def test_hungarian_matching_beats_greedy_nearest_point():
    # Point 0 is nearest to box 0's centre but also inside box 1; point 1 is inside box 0 only.
    # Greedy nearest-centre would give box 0 to point 0 and leave point 1 without a hit.
    boxes = [(0, 0, 10, 10), (8, 0, 30, 10)]
    points = [(9, 5), (2, 5)]
    pairs = dict(match_points(points, boxes))
    assert pairs == {0: 1, 1: 0}
    assert point_scores(points, boxes) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "hits": 2}


def test_point_scores_precision_recall_and_not_present():
    boxes = [(0, 0, 10, 10), (20, 20, 30, 30), (40, 40, 50, 50)]
    s = point_scores([(5, 5), (25, 25), (100, 100), (6, 6)], boxes)
    assert s["hits"] == 2  # (6, 6) is a second point on the same object: one match only
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert point_scores([], boxes)["f1"] == 0.0
    assert point_scores([], [])["f1"] == 1.0  # "not present" answered correctly
    assert point_scores([(1, 1)], [])["f1"] == 0.0


def test_score_reads_molmo_answers():
    from PIL import Image

    image = Image.new("RGB", (200, 100))
    point_q = Query("point", "Point to the cats.", image, boxes=[(0, 0, 20, 20), (100, 50, 140, 90)])
    absent_q = Query("point", "Point to the dogs.", image, boxes=[])
    count_q = Query("count", "How many cats?", image, boxes=point_q.boxes, count=2)
    clock_q = Query("clock", "What time is it?", image, time=(10, 35))
    answers = [
        '<points x1="5.0" y1="10.0" x2="60.0" y2="70.0" alt="cats">cats</points>',
        "There are none.",
        'Counting the <points x1="5.0" y1="10.0" x2="60.0" y2="70.0" alt="cats">cats</points>, there are 2.',
        "The time is 10:35.",
    ]
    report = score([point_q, absent_q, count_q, clock_q], answers)
    assert report["pointing"]["f1"] == 1.0 and report["pointing"]["not_present_accuracy"] == 1.0
    assert report["counting"]["accuracy"] == 1.0
    assert report["clock"]["accuracy"] == 1.0
    assert parse_count("Counting the <points ...>, there are 7.") == 7
    assert parse_count('<point x="1.0" y="2.0" alt="a">a</point>') == 1
    assert parse_count("There are none.") == 0
    assert parse_time("It is 9:05 now") == (9, 5) and parse_time("no idea") is None


def test_config_rejects_unknown_keys_and_loads_toml(tmp_path):
    with pytest.raises(ValueError, match="data.batch_sise"):
        TrainConfig.from_dict({"preset": "demo", "data": {"batch_sise": 2}})
    with pytest.raises(ValueError, match="data.scene.max_cnt"):
        TrainConfig.from_dict({"data": {"scene": {"max_cnt": 3}}})
    path = tmp_path / "run.toml"
    path.write_text('preset = "demo"\n[optim]\npreset = "finetune"\n[run]\nsteps = 7\n[data.scene]\nmax_count = 4\n')
    cfg = TrainConfig.load(path)
    assert cfg.run.steps == 7 and cfg.optim.llm_lr == 1e-5 and cfg.optim.connector_lr == 5e-6
    assert cfg.data.synthetic().scene.max_count == 4
    assert cfg.data.synthetic().scene.kinds == tuple(DEMO_SCENE["kinds"])  # the preset's, kept


def test_the_extras_old_keys_still_load():
    # Configs written before the extras had their section (the committed demo model's among
    # them) and `--set run.dense_loss=...` keep working.
    old = {"run": {"dense_loss": 0.5, "grounding_layers": [-2], "grounding_lead": True},
           "data": {"recovery_prob": 0.25}}  # fmt: skip
    cfg = TrainConfig.from_dict(old)
    assert cfg.extras.dense.weight == 0.5 and cfg.extras.recovery.prob == 0.25
    assert cfg.extras.grounding.layers == (-2,) and cfg.extras.grounding.lead
    assert "dense_loss" not in cfg.to_dict()["run"] and "recovery_prob" not in cfg.to_dict()["data"]
    demo = TrainConfig.load(Path(__file__).parents[1] / "models" / "molmo-demo" / "train_config.json")
    assert demo.extras == run_preset("demo-gpu").extras
    with pytest.raises(ValueError, match="name the same setting"):
        TrainConfig.from_dict({"run": {"dense_loss": 1.0}, "extras": {"dense": {"weight": 2.0}}})
    with pytest.raises(ValueError, match="extras.dense.wieght"):
        TrainConfig.from_dict({"extras": {"dense": {"wieght": 1.0}}})


def test_generic_training_modules_import_no_extra():
    # The trainer knows the extras only through training/supervision.py; the root config
    # (training/config.py) is what names them.
    import ast

    root = Path(__file__).parents[1] / "training"
    generic = [p for p in root.rglob("*.py") if "extras" not in p.parts and p.name != "config.py"]
    assert len(generic) > 20 and root / "train.py" in generic  # every module, new ones included
    for name in generic:
        tree = ast.parse(name.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("training.extras"), (name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("training.extras") for a in node.names), name


def test_an_extra_rides_from_the_loader_to_the_batch(pre, config):
    # Any Extra: its per-sequence targets are attached in the loader and joined into the batch
    # by their own `batch`, with each row's first crop; recovery-style `prepare` sees positions.
    from training.supervision import Extra

    class Rows:
        def __init__(self, rows, crops):
            self.rows, self.crops = rows, crops

        def __len__(self):
            return len(self.rows)

        def to(self, device):
            return self

        @classmethod
        def batch(cls, items):
            return cls([r for r, _, _ in items], [c for _, c, _ in items])

    class Probe(Extra):
        name = "probe"

        def __init__(self):
            self.positions: list[int] = []

        def prepare(self, example, seed, position):
            self.positions.append(position)
            return example

        def targets(self, example, packed):
            return Rows([None], [None])

    cfg = DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=3)
    probe = Probe()
    (batch,) = StepBatches(cfg, pre, _tokens_per_crop(config), end_step=2, extras=[probe])[1]
    assert probe.positions == [3, 4, 5]
    assert batch.extras["probe"].rows == [0, 1, 2] and batch.extras["probe"].crops == [0, 2, 4]


def test_length_sorted_split_keeps_the_loss_and_pads_less(pre, config, model64):
    cfg = DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=4)
    t = _tokens_per_crop(config)
    whole = StepBatches(cfg, pre, t, end_step=1)[0]
    cfg.max_batch_tokens = 1200
    split = StepBatches(cfg, pre, t, end_step=1)[0]
    assert len(whole) == 1 and len(split) > 1
    assert sum(b.input_ids.numel() for b in split) < whole[0].input_ids.numel()
    assert sum(b.n_images for b in split) == 4

    def loss(b):
        b.images = b.images.double()
        return _loss_sum(model64, b)

    assert torch.allclose(sum(loss(b) for b in split), loss(whole[0]), rtol=1e-6)


def test_step_batches_carry_real_annotation_text(pre, config):
    cfg = DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=2)
    micro = StepBatches(cfg, pre, _tokens_per_crop(config), end_step=1)[0]
    assert len(micro) == 1
    batch = micro[0]
    assert batch.n_images == 2 and batch.images.shape[0] == 4  # global view + one crop each
    n_patch = int((batch.input_ids == pre.tokenizer.im_patch_id).sum())
    assert batch.patch_order.shape[0] == n_patch
    assert int(batch.patch_order.max()) < batch.images.shape[0] * _tokens_per_crop(config)


def test_annotation_without_answer_is_rejected(pre):
    bad = Example(_example().image, [Annotation([{"role": "user", "content": "hi"}])])
    with pytest.raises(ValueError, match="assistant"):
        pack_example(bad, pre)


# ---------------------------------------------------------------- dense image-token loss


def test_dense_targets_mark_every_object_under_its_tokens(pre, config):
    from training.extras.dense import dense_targets, global_token_centres

    geo = config.preprocess
    kinds, colours = SCENES.scene.kinds, SCENES.scene.colours
    for index in range(6):
        ex = make_example("train", index, SCENES)
        w, h = ex.image.size
        t = dense_targets(ex.metadata, w, h, geo, kinds, colours)
        centres = global_token_centres(w, h, geo)
        assert t.kind.shape == (geo.tokens_per_side**2,)
        for o in ex.metadata["objects"]:
            x0, y0, x1, y1 = o["box"]
            on = [(x0 <= x < x1 and y0 <= y < y1) for x, y in centres.tolist()]
            assert any(on), f"object {o} is under no token centre"
            for i in (i for i, flag in enumerate(on) if flag):
                assert kinds[int(t.kind[i]) - 1] == o["kind"] and colours[int(t.colour[i]) - 1] == o["colour"]
                assert t.centre[i].tolist() == pytest.approx([o["centre"][0] / w, o["centre"][1] / h])
                # The characters the answer starts each coordinate with ("61.5" -> 6, 1; "8.3" -> 8, ".").
                text = format_points([tuple(o["centre"])], "x", width=w, height=h)
                xs, ys = text.split('x="')[1], text.split('y="')[1]
                chars = [10 if c == "." else int(c) for c in xs[:2] + ys[:2]]
                assert t.chars[i].tolist() == chars
        on_any = t.kind > 0
        assert int(on_any.sum()) < len(on_any)  # background tokens stay class 0
        assert bool((t.colour[~on_any] == 0).all()) and bool((t.centre[~on_any] == 0).all())
    assert dense_targets({}, 336, 336, geo, kinds, colours) is None  # no object list: no targets


def test_dense_object_attributes_add_the_object_tokens_kind_and_colour_loss(config):
    import torch.nn.functional as F

    from training.extras.dense import DenseHead, DenseTargets, dense_targets

    kinds, colours = SCENES.scene.kinds, SCENES.scene.colours
    exs = [make_example("train", i, SCENES) for i in range(2)]
    t = DenseTargets.stack([dense_targets(e.metadata, *e.image.size, config.preprocess, kinds, colours) for e in exs])
    torch.manual_seed(0)
    feats = torch.randn(2, t.kind.shape[1], 24)
    plain = DenseHead(24, len(kinds), len(colours))
    weighted = DenseHead(24, len(kinds), len(colours), object_attributes=2.0)
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        logits = plain.proj(feats)
    nk, nc = plain.n_kinds, plain.n_colours
    expected = 0.0
    for g in range(2):
        on = t.kind[g] > 0
        ce = F.cross_entropy(logits[g, :, :nk], t.kind[g], reduction="none") + F.cross_entropy(
            logits[g, :, nk : nk + nc], t.colour[g], reduction="none"
        )
        expected += 2.0 * float(ce[on].mean())
    with torch.no_grad():
        diff = float(weighted(feats, t) - plain(feats, t))
    assert diff == pytest.approx(expected, rel=1e-5) and diff > 0


def test_dense_classes_come_from_the_data(tmp_path):
    # Synthetic data: the scenes' own kinds and colours; JSONL data: those its objects name,
    # whatever the (unused) synthetic scene config says.
    from training.data.synthetic import write_synthetic_split
    from training.extras.dense import object_vocabulary

    assert object_vocabulary(DataConfig(scene=dict(DEMO_SCENE))) == (DEMO_SCENE["kinds"], DEMO_SCENE["colours"])
    path = write_synthetic_split(tmp_path, "train", 3, SCENES)
    kinds, colours = object_vocabulary(DataConfig(source="jsonl", path=str(path)))
    named = [json.loads(line)["metadata"]["objects"] for line in path.read_text().splitlines()]
    assert kinds == tuple(sorted({o["kind"] for objs in named for o in objs}))
    assert colours == tuple(sorted({o["colour"] for objs in named for o in objs}))


def test_global_token_centres_follow_the_letterbox(config):
    from training.extras.dense import global_token_centres

    geo = config.preprocess
    # 672x336 is scaled by 1/2 onto the 336 canvas and centred vertically (84 px bands).
    c = global_token_centres(672, 336, geo).view(geo.tokens_per_side, geo.tokens_per_side, 2)
    step = geo.crop_size / geo.tokens_per_side
    assert c[0, 0].tolist() == pytest.approx([step, (step / 2 - 84) * 2])
    assert c[-1, -1, 0].item() == pytest.approx(672 - step)


def test_dense_run_serves_a_plain_molmo_checkpoint(tmp_path):
    final = train(_run_config(tmp_path, steps=2, dense=1.0))
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["dense_loss"] > 0 and "grad_norm_dense" in rows[-1]
    served = _weights(final)
    fresh = MolmoForCausalLM(tiny(vocab_size=build_tokenizer().embedding_size)).state_dict()
    assert set(served) == set(fresh)  # the head is training-only


def test_grounding_targets_point_each_coordinate_at_its_object(pre, config, tok):
    from training.extras.grounding import grounding_targets

    checked = 0
    for index in range(8):
        ex = make_example("train", index, SCENES)
        packed = pack_example(ex, pre, 1024)
        g = grounding_targets(ex, packed, config.preprocess, tok, tok.im_patch_id)
        if g is None:
            continue
        w, h = ex.image.size
        keys = g.keys[0]
        assert bool((packed.input_ids[keys] == tok.im_patch_id).all()) and len(keys) == config.preprocess.tokens_per_side**2
        assert torch.allclose(g.target.sum(-1), torch.ones(len(g)))
        # Read each coordinate back from the labels: its digits are consecutive queries.
        labels = packed.labels
        runs, current = [], []
        for q, t in enumerate(g.positions.tolist()):
            if current and t != g.positions[current[-1]] + 1:
                runs.append(current)
                current = []
            current.append(q)
        runs.append(current)
        for run in runs:
            text = tok.decode([int(labels[g.positions[q]]) for q in run])
            value = float(text)
            token = int(g.target[run[0]].argmax())
            assert bool((g.target[run] == g.target[run[0]]).all())
            # The object under the target tokens has this number as its x or y percentage.
            from training.extras.dense import global_token_centres

            x, y = global_token_centres(w, h, config.preprocess)[token].tolist()
            obj = next(o for o in ex.metadata["objects"] if o["box"][0] <= x < o["box"][2] and o["box"][1] <= y < o["box"][3])
            assert value in (round(obj["centre"][0] / w * 100, 1), round(obj["centre"][1] / h * 100, 1)), (text, obj)
            checked += 1
    assert checked > 20


def test_grounding_lead_grounds_the_tokens_that_open_each_point(pre, config, tok):
    from training.extras.grounding import grounding_targets

    opening = {tok.encode(t)[0] for t in (" x", '="')} | {tok.encode(str(i))[0] for i in range(10)}
    checked = 0
    for index in range(8):
        ex = make_example("train", index, SCENES)
        packed = pack_example(ex, pre, 1024)
        plain = grounding_targets(ex, packed, config.preprocess, tok, tok.im_patch_id)
        lead = grounding_targets(ex, packed, config.preprocess, tok, tok.im_patch_id, lead=True)
        if plain is None:
            continue
        coords = dict(zip(plain.positions.tolist(), plain.target, strict=True))
        extra = [(t, g) for t, g in zip(lead.positions.tolist(), lead.target, strict=True) if t not in coords]
        assert set(coords) <= set(lead.positions.tolist()) and extra
        for t, target in extra:
            assert int(packed.labels[t]) in opening
            # The target is the one of the point it opens: that of the next coordinate.
            following = min(c for c in coords if c > t)
            assert torch.equal(target, coords[following])
            checked += 1
        # One ` x` opens each point (those on no token centre are not grounded at all).
        x_labels = [t for t, _ in extra if int(packed.labels[t]) == tok.encode(" x")[0]]
        assert 0 < len(x_labels) <= sum(len(ex.annotations[i].points or ()) for i in packed.kept)
    assert checked > 20


def test_grounding_loss_is_the_cross_entropy_of_the_heads_real_attention(pre, config, tok, model64):
    """The loss reads q and k from hooks; here the same head's attention is rebuilt the way
    MolmoBlock computes it (layout, RoPE, causal softmax over everything the query sees)."""
    from molmo_model.model import apply_rope, rope_cos_sin
    from training.extras.grounding import GroundingLoss, grounding_targets

    model = copy.deepcopy(model64).float()  # the shared fixture stays as it is
    ex = _example()
    one = next(e for e in split_annotations(ex) if e.annotations[0].points)
    packed = pack_example(one, pre, 1024)
    g = grounding_targets(one, packed, config.preprocess, tok, tok.im_patch_id)
    batch = collate([packed], tok.pad_id, _tokens_per_crop(config))
    g = g.for_row(0)
    loss_fn = GroundingLoss(model, (1,))
    captured = {}
    block = model.model.transformer.blocks[1]
    handle = block.attn_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    with torch.no_grad():
        model(**batch.model_inputs())
        got = loss_fn(g, batch.position_ids, batch.segment_ids)
    handle.remove()
    lc = config.llm
    b, s, _ = captured["x"].shape
    qkv = block.att_proj(captured["x"])
    q, k, _ = qkv.split([lc.num_attention_heads * lc.head_dim, lc.num_key_value_heads * lc.head_dim,
                         lc.num_key_value_heads * lc.head_dim], dim=-1)  # fmt: skip
    q = q.view(b, s, lc.num_attention_heads, lc.head_dim).transpose(1, 2)
    k = k.view(b, s, lc.num_key_value_heads, lc.head_dim).transpose(1, 2)
    cos, sin = rope_cos_sin(batch.position_ids, lc.head_dim, lc.rope_theta, q.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = (q[0, 0] @ k[0, 0].T) / lc.head_dim**0.5  # head 0 and its KV head
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    rows = probs[g.positions]  # [Q, S]
    want = -(g.target * rows.gather(1, g.keys).log()).sum()
    assert float(got) == pytest.approx(float(want), rel=1e-4)


# ---------------------------------------------------------------- order recovery


def test_format_points_keep_order_numbers_the_points_as_given():
    pts = [(0.5, 0.8), (0.1, 0.2)]
    assert format_points(pts, "dots") == '<points x1="10.0" y1="20.0" x2="50.0" y2="80.0" alt="dots">dots</points>'
    kept = format_points(pts, "dots", keep_order=True)
    assert kept == '<points x1="50.0" y1="80.0" x2="10.0" y2="20.0" alt="dots">dots</points>'


def _recovered(tok):
    """A training scene and its copy with every same-row pair's annotation rewritten."""
    import random

    from training.extras.recovery import recover_example

    for index in range(50):
        ex = make_example("train", index, SCENES)
        rx = recover_example(ex, 1.0, random.Random(index))
        if sum(bool(a.masked_points) for a in rx.annotations) >= 2:
            return ex, rx
    raise AssertionError("no scene with two recoverable annotations")


def test_recovery_writes_a_same_row_pair_in_reverse_and_masks_the_wrong_turn(pre, tok):
    from molmo_model.points import parse_points
    from training.extras.recovery import ROW

    ex, rx = _recovered(tok)
    w, h = ex.image.size
    packed, plain = pack_example(rx, pre, 1024), pack_example(ex, pre, 1024)
    for before, after in zip(ex.annotations, rx.annotations, strict=True):
        if not after.masked_points:
            assert after is before
            continue
        (i,) = after.masked_points
        old = [(p.x, p.y) for p in parse_points(before.answer, w, h)]
        new = [(p.x, p.y) for p in parse_points(after.answer, w, h)]
        # One neighbouring pair, in one row, swapped; the count the answer states is unchanged.
        assert new == old[:i] + [old[i + 1], old[i]] + old[i + 2 :]
        assert abs(old[i + 1][1] - old[i][1]) <= ROW * h + 1
        assert parse_count(after.answer) == parse_count(before.answer) == len(old)
        assert all(math.dist(a, b) < 1 for a, b in zip(after.points, new, strict=True))  # in the written order
        # Labels: only the moved point's x digits lose theirs; everything else is trained.
        segment = packed.kept.index(rx.annotations.index(after)) + 1
        mine = (packed.segment_ids == segment).nonzero().flatten().tolist()
        text = "".join(tok.decode([int(packed.input_ids[t + 1])]) if packed.labels[t] >= 0 else "_" for t in mine[:-1])
        x = f"{new[i][0] / w * 100:.1f}"
        assert f'x{i + 1}="{"_" * len(x)}"' in text, text
        labelled = sum(int(packed.labels[t] >= 0) for t in mine)
        plain_segment = plain.kept.index(ex.annotations.index(before)) + 1
        plain_labelled = int((plain.labels[plain.segment_ids == plain_segment] >= 0).sum())
        assert labelled == plain_labelled - len(x)


def test_recovery_grounds_the_points_in_the_order_written_and_not_the_wrong_turn(pre, config, tok):
    from molmo_model.points import parse_points
    from training.extras.dense import global_token_centres
    from training.extras.grounding import grounding_targets

    ex, rx = _recovered(tok)
    w, h = ex.image.size
    packed = pack_example(rx, pre, 1024)
    g = grounding_targets(rx, packed, config.preprocess, tok, tok.im_patch_id, lead=True)
    centres = global_token_centres(w, h, config.preprocess)
    checked = 0
    for segment, index in enumerate(packed.kept, start=1):
        ann = rx.annotations[index]
        if not ann.masked_points:
            continue
        (i,) = ann.masked_points
        points = [(p.x, p.y) for p in parse_points(ann.answer, w, h)]
        mine = [q for q, t in enumerate(g.positions.tolist()) if int(packed.segment_ids[t]) == segment]
        objects = set()
        for q in mine:
            x, y = centres[int(g.target[q].argmax())].tolist()
            box = next(o["box"] for o in ex.metadata["objects"] if o["box"][0] <= x < o["box"][2] and o["box"][1] <= y < o["box"][3])
            objects.add(tuple(box))
        on = lambda p: next(tuple(o["box"]) for o in ex.metadata["objects"] if inside(p, o["box"]))  # noqa: E731
        # Every written point but the wrong turn is grounded, on its own object.
        assert on(points[i]) not in objects
        assert objects <= {on(p) for p in points}
        assert on(points[i + 1]) in objects
        checked += 1
    assert checked >= 2


def test_recovery_batches_are_a_function_of_the_step(pre, config):
    def batches(prob):
        cfg = DataConfig(scene=dict(DEMO_SCENE), clock_fraction=0.0, batch_size=4)
        extras = [RecoveryExtra(RecoveryConfig(prob))] if prob else []
        sb = StepBatches(cfg, pre, _tokens_per_crop(config), end_step=3, extras=extras)
        return [b.labels for b in sb[2]]

    first, again, off = batches(0.5), batches(0.5), batches(0.0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(int((b == IGNORE).sum()) for b in first) > sum(int((b == IGNORE).sum()) for b in off)
    with pytest.raises(ValueError, match="extras.recovery.prob"):
        RecoveryConfig(prob=1.5)


def test_grounding_start_looks_at_every_object_of_the_answer_from_its_first_token(pre, config, tok):
    from training.extras.dense import global_token_centres, on_box
    from training.extras.grounding import grounding_targets

    checked = 0
    for index in range(8):
        ex = make_example("train", index, SCENES)
        packed = pack_example(ex, pre, 1024)
        lead = grounding_targets(ex, packed, config.preprocess, tok, tok.im_patch_id, lead=True)
        both = grounding_targets(ex, packed, config.preprocess, tok, tok.im_patch_id, lead=True, start=True)
        if lead is None:
            continue
        old = set(lead.positions.tolist())
        extra = {t: g for t, g in zip(both.positions.tolist(), both.target, strict=True) if t not in old}
        centres = global_token_centres(*ex.image.size, config.preprocess)
        for segment, k in enumerate(packed.kept, start=1):
            ann = ex.annotations[k]
            mine = (packed.segment_ids == segment).nonzero().flatten().tolist()
            first = next(t for t in mine if packed.labels[t] >= 0)
            if not ann.points:
                assert first not in extra
                continue
            # The position that writes the answer's first token, on all its objects, evenly.
            on = torch.zeros(len(centres))
            for o in ex.metadata["objects"]:
                if any(inside(p, o["box"]) for p in ann.points):
                    on = torch.maximum(on, on_box(centres, o["box"]).float())
            assert torch.allclose(extra.pop(first), on / on.sum())
            checked += 1
        assert not extra
    assert checked > 5
