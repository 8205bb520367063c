"""LoRA fine-tuning (issue 24): `molmo train --lora`, `molmo eval --lora`, `molmo export --merge-lora`.

The end-to-end test is the user's path on a checkpoint in Ai2's release layout (test_finetune's
release_checkpoint: the official config fields, Qwen-sized vocabulary, tiny widths, random
weights) and a one-image JSONL: the base scores pointing F1 0 on it; a rank-16 adapter
trained for 80 steps on the frozen base raises it to 1 (`molmo eval --lora`, both engines,
the same answers); the merged checkpoint (`molmo export --merge-lora`) answers as the adapter
does; and PEFT itself, wrapping our reference model with the adapter folder as written,
gives the merged model's logits (the format is PEFT's, not only named like it).

The others, in-process: resuming a LoRA run equals an uninterrupted one (adapter tensors),
gradient checkpointing gives the same gradients and keeps fewer activations, the memory
estimate is close to what autograd keeps, and the bad inputs exit 2 naming the problem.

    pytest tests/test_lora_training.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file
from test_finetune import release_checkpoint, write_data

from molmo_cli.export import export
from molmo_model.checkpoint import load_checkpoint
from molmo_model.config import tiny
from molmo_model.lora import LoRAConfig, add_lora
from molmo_model.model import MolmoForCausalLM
from training import cli
from training.memory import estimate_memory

LORA_RUN = ["--lora", "16", "--lora-dropout", "0", "--steps", "80", "--batch-size", "1", "--lr-scale", "20",
            "--max-len", "512", "--set=optim.llm_warmup=1", "--set=optim.connector_warmup=1",
            "--set=optim.vit_warmup=1", "--set=run.log_every=10", "--set=run.progress=false"]  # fmt: skip


def _molmo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "molmo_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"molmo {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def _eval(model: Path, data: Path, out: Path, *extra: str) -> dict:
    _molmo("eval", "--model", str(model), "--data", str(data), "--dtype", "float32", "--answers",
           "--out", str(out), *extra)  # fmt: skip
    return json.loads(out.read_text())


@pytest.mark.vllm
def test_lora_on_a_release_checkpoint_raises_pointing_f1_and_merges_to_the_same_answers(tmp_path):
    release = release_checkpoint(tmp_path / "release")
    data = write_data(tmp_path / "data")
    base = _eval(release, data, tmp_path / "base.json", "--engine", "reference")
    assert base["pointing"]["f1"] == 0.0  # random weights point at nothing

    run = tmp_path / "run"
    done = _molmo("train", "--init-from", str(release), "--data", str(data), "--out", str(run), *LORA_RUN)
    # Before the first step: what trains, and what it should need.
    assert "LoRA rank 16 (alpha 32, dropout 0) on att_proj,attn_out,ff_proj,ff_out: 53,248 trainable" in done.stdout
    assert "memory (an estimate, training/memory.py): frozen weights" in done.stdout
    adapter = run / "adapter"
    assert f"molmo serve --model {release} --lora-modules run={adapter}" in done.stdout
    # Checkpoints and the result hold the adapter (and its optimizer) only, never the base.
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert {p.name for p in checkpoint.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                        "train_config.json", "training_state.pt"}  # fmt: skip
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == 2 * 4 * 2 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16

    reports = {engine: _eval(release, data, tmp_path / f"lora_{engine}.json", "--lora", str(adapter), "--engine",
                             engine) for engine in ("reference", "vllm")}  # fmt: skip
    for report in reports.values():
        assert report["pointing"]["f1"] > base["pointing"]["f1"]
        assert report["pointing"]["f1"] == 1.0 and report["counting"]["accuracy"] == 1.0
    assert reports["vllm"]["per_query"] == reports["reference"]["per_query"]  # the answers, word for word

    merged = tmp_path / "merged"
    done = _molmo("export", "--merge-lora", "--model", str(release), "--lora", str(adapter), "--out", str(merged))
    assert f"molmo serve --model {merged}" in done.stdout
    record = json.loads((merged / "lora_merge.json").read_text())
    assert record["rank"] == 16 and record["modules"] == 8
    assert (merged / "tokenizer.json").read_bytes() == (release / "tokenizer.json").read_bytes()
    as_merged = _eval(merged, data, tmp_path / "merged.json", "--engine", "reference")
    assert as_merged["per_query"] == reports["reference"]["per_query"]

    # PEFT's own loader on our reference model, from the folder as written.
    peft = pytest.importorskip("peft")
    ids = torch.arange(3, 40)[None]
    model, _, _ = load_checkpoint(release, dtype=torch.float32, with_tokenizer=False)
    config = peft.LoraConfig.from_pretrained(str(adapter))
    config.task_type = None  # a plain torch module: PEFT's generic model, not transformers' generation mixin
    wrapped = peft.PeftModel.from_pretrained(model.eval(), str(adapter), config=config).eval()
    assert sum(n.endswith(".lora_A") for n, _ in wrapped.named_modules()) == 8
    merged_model, _, _ = load_checkpoint(merged, dtype=torch.float32, with_tokenizer=False)
    with torch.no_grad():
        got, want = wrapped(ids).logits, merged_model.eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_a_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, tiny_checkpoint):
    data = write_data(tmp_path / "data")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Dropout on (0.05 by default): the restored RNG state matters too.
    argv = ["--init-from", str(tiny_checkpoint), "--data", str(data), "--lora", "4", "--steps", "4",
            "--max-len", "512", "--set", "run.progress=false", "--set", "run.log_every=1"]  # fmt: skip
    assert cli.train([*argv, "--out", str(straight)]) == 0
    assert cli.train([*argv, "--out", str(resumed), "--set", "run.save_every=2"]) == 0
    shutil.rmtree(resumed / "checkpoints" / "step-000004")  # a crash after step 2's checkpoint
    shutil.rmtree(resumed / "adapter")
    assert not (resumed / "checkpoints" / "step-000002" / "model.safetensors").exists()  # adapter + optimizer only
    assert cli.train([*argv, "--out", str(resumed), "--set", "run.save_every=2"]) == 2  # needs --resume
    assert cli.train([*argv, "--out", str(resumed), "--set", "run.save_every=2", "--resume"]) == 0
    a, b = _adapter_tensors(straight), _adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    losses = [json.loads(r)["loss"] for r in (resumed / "log.jsonl").read_text().splitlines()]
    want = [json.loads(r)["loss"] for r in (straight / "log.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(want, rel=1e-6)


def _lora_model(dropout: float = 0.1) -> tuple[MolmoForCausalLM, LoRAConfig]:
    torch.manual_seed(0)
    model = MolmoForCausalLM(tiny()).init_weights(seed=0).train()
    model.requires_grad_(False)
    lora = LoRAConfig(rank=4, alpha=8, dropout=dropout)
    add_lora(model, lora, seed=0)
    return model, lora


def _step(model: MolmoForCausalLM, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one step (dropout drawn from a fixed seed), and the bytes autograd keeps
    for backward (each storage once)."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, response_dropout=0.1, response_mask=ids > 50).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(kept.values())


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    model, _ = _lora_model()
    ids = torch.randint(0, 100, (2, 96), generator=torch.Generator().manual_seed(0))
    plain, plain_bytes = _step(model, ids)
    model.grad_checkpointing = True
    again, again_bytes = _step(model, ids)
    assert plain.keys() == again.keys() and len(plain) == 2 * 4 * 2
    for name in plain:  # dropout masks are replayed in the recomputation
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-7)
    assert again_bytes < 0.5 * plain_bytes, (again_bytes, plain_bytes)
    model.eval()  # inference never recomputes
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits)


def test_the_memory_estimate_is_close_to_what_autograd_keeps():
    model, lora = _lora_model(dropout=0.05)
    seq = 256
    ids = torch.randint(0, 100, (1, seq), generator=torch.Generator().manual_seed(0))
    _, kept = _step(model, ids)
    est = estimate_memory(model.config, lora, "float32", 1, seq, bf16_autocast=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (est.total_params, est.trainable_params) == (sum(p.numel() for p in model.parameters()), trainable)
    assert est.trainable_bytes == 16 * trainable  # weight, gradient and AdamW's two moments, float32
    assert 0.75 * kept < est.activation_bytes < 1.25 * kept, (est.activation_bytes, kept)


def test_grad_checkpointing_flag_reaches_the_config(capsys):
    argv = ["--init-from", "x", "--data", "y.jsonl", "--lora", "8", "--grad-checkpointing", "--print-config"]
    assert cli.train(argv) == 0
    assert json.loads(capsys.readouterr().out)["run"]["grad_checkpointing"] is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora", "0"], "--lora RANK must be an integer >= 1"),
        (["--lora-alpha", "16"], "--lora-alpha shapes a LoRA adapter: give its rank with --lora RANK"),
        (["--lora", "8", "--lora-targets", "lm_head"], "lora.targets: unknown"),
        (["--lora", "8", "--lora-dropout", "1.5"], "lora.dropout must be in [0, 1)"),
    ],
    ids=["rank-0", "alpha-without-rank", "unknown-target", "dropout"],
)
def test_bad_lora_flags_exit_2_naming_the_problem(argv, message, tmp_path, tiny_checkpoint, capsys):
    data = write_data(tmp_path / "data")
    code = cli.train(["--init-from", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "run"),
                      "--steps", "1", *argv])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter").exists()


def test_lora_on_fresh_weights_is_refused(tmp_path, capsys):
    data = write_data(tmp_path / "data")
    assert cli.train(["--data", str(data), "--lora", "8", "--set", "model.preset=tiny", "--out", str(tmp_path)]) == 2
    assert "a LoRA adapts trained weights" in capsys.readouterr().err


def test_export_refuses_bad_inputs_with_exit_2(tmp_path, tiny_checkpoint, capsys):
    model = MolmoForCausalLM(tiny()).init_weights(seed=0)
    add_lora(model, LoRAConfig(rank=4, alpha=8))
    from molmo_model.lora import save_adapter

    adapter = save_adapter(model, LoRAConfig(rank=4, alpha=8), tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("taken")
    demo = ROOT / "models" / "molmo-demo"
    cases = [
        (["--model", str(tiny_checkpoint), "--lora", str(adapter), "--out", str(tmp_path / "a")],
         "say what to export: --merge-lora"),
        (["--merge-lora", "--model", str(tmp_path / "nothing"), "--lora", str(adapter), "--out", str(tmp_path / "b")],
         "is not a checkpoint folder (no config.json)"),
        (["--merge-lora", "--model", str(tiny_checkpoint), "--lora", str(tmp_path / "none"), "--out",
          str(tmp_path / "c")], "is not a folder"),
        (["--merge-lora", "--model", str(tiny_checkpoint), "--lora", str(adapter), "--out", str(tmp_path / "full")],
         "exists and is not empty"),
        (["--merge-lora", "--model", str(demo), "--lora", str(adapter), "--out", str(tmp_path / "d")],
         "does not fit the base model: tensors of another shape"),
    ]  # fmt: skip
    for argv, message in cases:
        assert export(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert (tmp_path / "full" / "x").read_text() == "taken"
    assert export(["--merge-lora", "--model", str(tiny_checkpoint), "--lora", str(adapter), "--out",
                   str(tmp_path / "ok")]) == 0  # fmt: skip
    assert (tmp_path / "ok" / "model.safetensors").exists()


def test_the_gpu_lora_script_runs_its_cases_on_the_cpu(tmp_path):
    """benchmarks/gpu_lora_7b.py's code path on the tiny preset (the GPU run is 7B's shapes)."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_lora_7b.py", "--preset", "tiny", "--device", "cpu",
                           "--seq-len", "1536", "--batch-size", "1", "--steps", "1", "--warmup", "0", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_lora_7b_cpu_tiny.json").read_text())
    rows = result["rows"]
    assert [r["grad_checkpointing"] for r in rows] == [True, False]
    assert all(1197 < r["seq_len"] <= 1536 and r["estimate_gib"] > 0 and r["step_s_median"] > 0 for r in rows)
