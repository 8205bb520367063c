"""Our vLLM Molmo 2 model against vLLM 0.32's built-in one, both fed by our processor.

The issue: serve Molmo 2 with our own vLLM model class (molmo_vllm/molmo2_model.py: our
plain-PyTorch vision side, our paged decoder with Ai2's bidirectional image prefill), or
with vLLM's built-in `Molmo2ForConditionalGeneration`
(vllm/model_executor/models/molmo2.py) behind our processor? The baseline is ours (what the
plugin serves); the candidate is the built-in. Both run on the same checkpoint, in the same
run, with the same engine arguments: the golden release checkpoint of
tests/molmo2_release.py (Molmo2-4B's layout, full SigLIP 2 tower, tiny decoder), float32,
eager, prefix caching and vLLM's multimodal processor cache off. Each engine lives in its own
child process (`--worker`) with VLLM_ENABLE_V1_MULTIPROCESSING=0, so the engine core runs in
that process and the model registration below is the one it uses.

Measured per engine: (a) fidelity to Ai2's code on tests/golden/ai2_molmo2.json: prompt ids
equal, the 12 greedy tokens equal, the largest |difference| of the first token's log-probs on
Ai2's top 5, for one image, two images and the 4-frame video; (b) speed: seconds to build
`vllm.LLM`, and the median latency of a single-image request (the 640x480 golden image, 5
crops: preprocessing + vision + prefill) with max_tokens 1 and 16 after one warm-up request,
the two engines' requests alternating; (c) which vLLM interfaces the class declares and how
many of each side's linear layers are vLLM's (quantizable) ones. `--gemm` times the SigLIP 2
tower's four projections through torch and through vLLM's CPU GEMM.

How the built-in is run (experiment-only; nothing of it is in the product):
* model: a subclass of the built-in class registered for the architecture in place of ours.
  Its __init__ reads `vit_config` / `adapter_config` as attributes, while our config shim
  (molmo_vllm/config.py) keeps them dicts: the subclass wraps them in namespaces first.
* processor: ours (`Molmo2MultiModalProcessor`), with an adapter that adds the kwargs the
  built-in's `embed_multimodal` reads (`image_num_pooled_patches`, `image_num_patches`,
  `image_tokens`, `num_image_tokens` and the video ones) and marks as embedding positions
  every image structure token the built-in embeds (patch, column, start and end tokens), not
  only `<im_patch>`: the built-in returns an embedding for each of them.
No torchvision is needed: the built-in's own processor (which would be) is never called.

    python experiments/molmo2_builtin_vs_ours.py [--model DIR] [--repeats 4]
    OMP_NUM_THREADS=2 python experiments/molmo2_builtin_vs_ours.py --name molmo2_builtin_vs_ours_cpu_omp2
    python experiments/molmo2_builtin_vs_ours.py --gemm     # why the speeds differed (gemm_check)
    python experiments/molmo2_builtin_vs_ours.py --name molmo2_builtin_vs_ours_cpu_enginegemm  # after
    python experiments/molmo2_builtin_vs_ours.py --vision   # the towers alone (vision_check)

Writes experiments/results/molmo2_builtin_vs_ours_cpu.json/.csv (one row per engine; NAME
with --name), NAME_gemm.json/.csv with --gemm, NAME_vision.json/.csv with --vision.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path[:] = [str(_ROOT), str(_ROOT / "tests")] + [
    p for p in sys.path if Path(p or ".").resolve() != _HERE
]

ENGINES = ("ours", "builtin")  # ours: the baseline
CASES = ("single_image", "two_images", "video")
MAX_TOKENS = (1, 16)  # timed requests: prefill (vision + prompt) alone, and with 15 decode steps
ENGINE_ARGS = dict(
    enforce_eager=True,
    dtype="float32",
    max_model_len=2048,
    max_num_seqs=2,
    seed=0,
    limit_mm_per_prompt={"image": 2, "video": 1},
    skip_mm_profiling=True,
    enable_prefix_caching=False,
    mm_processor_cache_gb=0,
)


# ---------------------------------------------------------------- the built-in, behind our processor


def register_builtin() -> None:
    """Registers vLLM's built-in Molmo 2 model, fed by our processor plus a kwargs adapter, for
    the architecture name (after our plugin, so it wins)."""
    from types import SimpleNamespace

    import torch
    from vllm import ModelRegistry
    from vllm.model_executor.models import molmo2 as builtin
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalFieldConfig
    from vllm.multimodal.processing import (
        PromptInsertion,
        PromptReplacement,
        PromptUpdateDetails,
    )

    import molmo_vllm
    from molmo_vllm.config import MOLMO2_ARCHITECTURE
    from molmo_vllm.molmo2_processor import (
        Molmo2DummyInputsBuilder,
        Molmo2MultiModalProcessor,
        Molmo2ProcessingInfo,
    )

    molmo_vllm.register()

    def embed_ids(cfg) -> list[int]:
        """The token ids the built-in embeds itself (its processor's `emb_tok_ids`)."""
        names = ("image_patch_id", "image_col_id", "image_start_token_id",
                 "low_res_image_start_token_id", "frame_start_token_id", "image_end_token_id",
                 "frame_end_token_id", "image_low_res_id")  # fmt: skip
        return [int(getattr(cfg, n)) for n in names]

    class AdaptedProcessor(Molmo2MultiModalProcessor):
        def _call_hf_processor(self, hf_data, hf_kwargs):
            out = super()._call_hf_processor(hf_data, hf_kwargs)
            pre, cfg = self.info.preprocessor, self.info.get_hf_config()
            keep = torch.tensor(embed_ids(cfg))
            n_patches = None
            if "pixel_values" in out:
                n_patches = out["pixel_values"].shape[1]
                spans = [
                    torch.tensor(pre.image_layout(int(w), int(h)).tokens)
                    for w, h in out["image_size"].tolist()
                ]
                spans = [s[torch.isin(s, keep)] for s in spans]
                out["image_num_pooled_patches"] = out["image_num_tokens"]
                out["image_num_patches"] = out["image_num_crops"] * n_patches
                out["image_tokens"] = torch.cat(spans)
                out["num_image_tokens"] = torch.tensor([len(s) for s in spans])
            if "pixel_values_videos" in out:
                n_patches = out["pixel_values_videos"].shape[1]
                frames = out["video_num_frames"].tolist()
                stamps = out["video_timestamps"].split(frames)
                spans = [torch.tensor(self.info.video_token_ids(t.tolist())) for t in stamps]
                spans = [s[torch.isin(s, keep)] for s in spans]
                out["video_num_pooled_patches"] = out["video_num_tokens"]
                out["video_num_patches"] = out["video_num_frames"] * n_patches
                out["video_tokens"] = torch.cat(spans)
                out["num_video_tokens"] = torch.tensor([len(s) for s in spans])
            return out

        def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
            fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
            empty = torch.empty(0, dtype=torch.long)
            for modality, prefix, count in (("image", "image", "num_image_tokens"),
                                            ("video", "video", "num_video_tokens")):  # fmt: skip
                for name in (f"{prefix}_num_pooled_patches", f"{prefix}_num_patches", count):
                    fields[name] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
                fields[f"{prefix}_tokens"] = MultiModalFieldConfig.flat_from_sizes(
                    modality, hf_inputs.get(count, empty)
                )
            return fields

        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            keep = embed_ids(self.info.get_hf_config())

            def widen(fn):
                return lambda i: PromptUpdateDetails.select_token_ids(fn(i).full, keep)

            updates = []
            for u in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
                if isinstance(u, PromptReplacement):
                    updates.append(PromptReplacement(u.modality, u.target, widen(u.replacement)))
                else:
                    updates.append(PromptInsertion(u.modality, u.target, widen(u.insertion)))
            return updates

    @MULTIMODAL_REGISTRY.register_processor(
        AdaptedProcessor, info=Molmo2ProcessingInfo, dummy_inputs=Molmo2DummyInputsBuilder
    )
    class BuiltinMolmo2(builtin.Molmo2ForConditionalGeneration):
        def __init__(self, *, vllm_config, prefix: str = ""):
            cfg = vllm_config.model_config.hf_config
            for name in ("vit_config", "adapter_config"):
                if isinstance(getattr(cfg, name), dict):
                    setattr(cfg, name, SimpleNamespace(**getattr(cfg, name)))
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    ModelRegistry.register_model(MOLMO2_ARCHITECTURE, BuiltinMolmo2)


def interfaces(cls) -> dict[str, object]:
    """The vLLM interfaces a model class declares (vLLM's own checks)."""
    from vllm.model_executor.models.interfaces import supports_lora, supports_pp

    named = next(c for c in cls.__mro__ if c.__module__ != "__main__")  # the built-in, not our subclass
    return {
        "class": f"{named.__module__}.{named.__qualname__}",
        "SupportsLoRA": bool(supports_lora(cls)),
        "SupportsPP": bool(supports_pp(cls)),
        "SupportsQuant": any(b.__name__ == "SupportsQuant" for b in cls.__mro__),
        "packed_modules": sorted(getattr(cls, "packed_modules_mapping", {})),
    }


def linear_layers(model) -> dict[str, dict[str, int]]:
    """Linear layers of the loaded model, vision side (modules named *vision*) and the rest:
    vLLM's (`LinearBase`, what vLLM quantization and LoRA act on) and plain `nn.Linear`."""
    from torch import nn
    from vllm.model_executor.layers.linear import LinearBase

    counts = {side: {"vllm_linear": 0, "torch_linear": 0} for side in ("vision", "decoder")}
    for name, module in model.named_modules():
        side = counts["vision" if "vision" in name else "decoder"]
        if isinstance(module, LinearBase):
            side["vllm_linear"] += 1
        elif isinstance(module, nn.Linear):
            side["torch_linear"] += 1
    return counts


# ---------------------------------------------------------------- one engine (a child process)


def worker(engine: str, model_dir: str) -> None:
    import molmo2_release
    import torch
    from vllm import LLM, ModelRegistry, SamplingParams

    from molmo_model.tokenizer import Molmo2Tokenizer
    from molmo_vllm.prompt import build_prompt

    if engine == "builtin":
        register_builtin()
    else:
        import molmo_vllm

        molmo_vllm.register()
    from molmo_vllm.config import MOLMO2_ARCHITECTURE

    golden = molmo2_release.golden()
    cls = ModelRegistry._try_load_model_cls(MOLMO2_ARCHITECTURE)
    result: dict[str, object] = {"engine": engine, "interfaces": interfaces(cls)}
    tok = Molmo2Tokenizer.from_dir(model_dir)
    questions = {"single_image": (molmo2_release.PROMPT, ["single_640x480"]),
                 "two_images": (molmo2_release.TWO_IMAGE_PROMPT, ["pair_a_300x500", "pair_b_120x90"])}  # fmt: skip
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the images' resize, as the goldens were made (test_molmo2_golden)
    prompts = {c: build_prompt(tok, q, [molmo2_release.image(n) for n in names])
               for c, (q, names) in questions.items()}  # fmt: skip
    torch.set_num_threads(saved)
    video = (molmo2_release.video_frames(), {"fps": molmo2_release.VIDEO["fps"]})
    prompts["video"] = build_prompt(tok, molmo2_release.VIDEO_PROMPT, video=video)

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, **ENGINE_ARGS)
    result["engine_start_s"] = round(time.perf_counter() - t0, 2)
    result["torch_threads_in_engine"] = llm.apply_model(lambda _: torch.get_num_threads())[0]
    try:
        result["linear_layers"] = llm.apply_model(linear_layers)[0]
    except Exception as e:  # noqa: BLE001 - a count, not the measurement
        result["linear_layers"] = f"{type(e).__name__}: {e}"

    fidelity = {}
    for case in CASES:
        g = golden["cases"][case]
        top5 = dict(g["top5_first_logprobs"])
        causal = dict(g.get("causal_only_top5_first_logprobs") or [])
        params = SamplingParams(temperature=0.0, max_tokens=golden["new_tokens"], ignore_eos=True,
                                logprob_token_ids=sorted(set(top5) | set(causal)))  # fmt: skip
        try:
            out = llm.generate([prompts[case]], params, use_tqdm=False)[0]
        except Exception as e:  # noqa: BLE001 - recorded, the other cases still run
            fidelity[case] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        got = out.outputs[0]
        first = {i: lp.logprob for i, lp in got.logprobs[0].items()}
        tokens = list(got.token_ids)
        fidelity[case] = {
            "prompt_ids_equal": list(out.prompt_token_ids) == g["prompt_ids"],
            "greedy_tokens_equal": tokens == g["greedy_tokens"],
            "greedy_tokens_agreeing_prefix": next(
                (i for i, (a, b) in enumerate(zip(tokens, g["greedy_tokens"], strict=True)) if a != b),
                len(tokens),
            ),
            "first_top5_max_abs_diff": max(abs(first[i] - lp) for i, lp in top5.items()),
        }
        if causal:  # Ai2's code with plain causal attention (no bidirectional image prefill)
            fidelity[case]["first_top5_max_abs_diff_to_ai2_causal"] = max(
                abs(first[i] - lp) for i, lp in causal.items()
            )
    result["fidelity"] = fidelity

    single = prompts["single_image"]
    llm.generate([single], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)  # warm-up
    reply(result)
    # Timed requests on the parent's command ("N": one request of max_tokens N), so that the
    # two engines' requests alternate and share the machine's load alike.
    for line in sys.stdin:
        if not line.strip().isdigit():
            break
        p = SamplingParams(temperature=0.0, max_tokens=int(line), ignore_eos=True)
        t = time.perf_counter()
        llm.generate([single], p, use_tqdm=False)
        reply(time.perf_counter() - t)
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


MARK = "@@molmo2-experiment "


def reply(value: object) -> None:
    print(MARK + json.dumps(value), flush=True)


class Engine:
    """A worker process: its setup result, then one timed request per `request()`."""

    def __init__(self, engine: str, model: Path, env: dict[str, str], log: Path) -> None:
        self.name, self.log = engine, log
        cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model)]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True)  # fmt: skip
        t0 = time.perf_counter()
        self.result = self._read()
        self.result["process_ready_s"] = round(time.perf_counter() - t0, 1)

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        tail = self.log.read_text().strip().splitlines()[-25:]
        raise RuntimeError(f"{self.name} worker ended (exit {self.proc.wait()}):\n" + "\n".join(tail))

    def request(self, max_tokens: int) -> float:
        self.proc.stdin.write(f"{max_tokens}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- why the speeds differ


def gemm_check(repeats: int) -> list[dict[str, object]]:
    """The SigLIP 2 tower's four projections over the single-image request's 5 crops
    ([5 * 729, 1152] through qkv [1152 -> 3456], wo [1152 -> 1152], w1 [1152 -> 4304] and
    w2 [4304 -> 1152], float32) through torch's `F.linear` (a plain `nn.Linear`) and through
    vLLM's CPU GEMM (`onednn_mm`, what vLLM's linear layers dispatch to here), at 1 torch
    thread and 2. Median ms of `repeats` calls, GFLOP/s, and the largest difference."""
    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    rows = []
    saved = torch.get_num_threads()
    m = 5 * 729
    for proj, (k, n) in {"qkv": (1152, 3456), "wo": (1152, 1152), "w1": (1152, 4304), "w2": (4304, 1152)}.items():
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) * k**-0.5
        b = torch.randn(n, generator=g) * 0.02
        handle = ops.create_onednn_mm(w.t(), 32)
        diff = float((F.linear(x, w, b) - ops.onednn_mm(handle, x, b)).abs().max())
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, fn in (("torch F.linear", functools.partial(F.linear, x, w, b)),
                             ("vLLM onednn_mm", functools.partial(ops.onednn_mm, handle, x, b))):  # fmt: skip
                fn()
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                med = statistics.median(times)
                rows.append({"projection": proj, "shape": [m, k, n], "gemm": name, "torch_threads": threads,
                             "median_ms": round(1000 * med, 1), "gflops": round(2 * m * k * n / med / 1e9),
                             "max_abs_diff": diff})  # fmt: skip
    torch.set_num_threads(saved)
    return rows


def vision_worker(engine: str, model_dir: str, out_path: str, repeats: int) -> None:
    """--vision: one engine's vision tower (`vision_backbone.forward`) timed inside vLLM on the
    single-image request, and its output features saved for the other engine's comparison."""
    import molmo2_release
    import torch
    from vllm import LLM, SamplingParams

    from molmo_model.tokenizer import Molmo2Tokenizer
    from molmo_vllm.prompt import build_prompt

    if engine == "builtin":
        register_builtin()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the image's resize, as the goldens were made
    tok = Molmo2Tokenizer.from_dir(model_dir)
    prompt = build_prompt(tok, molmo2_release.PROMPT, [molmo2_release.image("single_640x480")])
    torch.set_num_threads(saved)
    llm = LLM(model=model_dir, **ENGINE_ARGS)

    def timed(model):  # both classes name their tower vision_backbone
        tower = getattr(model, "vision_backbone", None) or model.model.vision_backbone
        forward, model._vision_calls = tower.forward, []

        def run(*args, **kwargs):
            t = time.perf_counter()
            out = forward(*args, **kwargs)
            model._vision_calls.append((time.perf_counter() - t, out.detach().float().cpu()))
            return out

        tower.forward = run
        return True

    llm.apply_model(timed)
    for _ in range(repeats + 1):  # the first: warm-up
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    calls = llm.apply_model(lambda m: m._vision_calls)[0]
    threads = llm.apply_model(lambda _: torch.get_num_threads())[0]
    torch.save({"seconds": [s for s, _ in calls[1:]], "features": calls[-1][1], "threads": threads}, out_path)
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def vision_check(model: Path, env: dict[str, str], repeats: int) -> tuple[list[dict[str, object]], float]:
    import torch

    rows, feats = [], {}
    for engine in ENGINES:
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            out = Path(f.name)
        cmd = [sys.executable, __file__, "--vision-worker", engine, "--model", str(model),
               "--repeats", str(repeats), "--vision-out", str(out)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = torch.load(out)
        out.unlink()
        feats[engine] = got["features"]
        rows.append({"engine": engine, "vision_calls": len(got["seconds"]),
                     "vision_median_s": round(statistics.median(got["seconds"]), 3),
                     "vision_all_s": [round(x, 3) for x in got["seconds"]],
                     "features_shape": list(got["features"].shape),
                     "torch_threads_in_engine": got["threads"]})  # fmt: skip
    diff = float((feats["ours"] - feats["builtin"]).abs().max())
    return rows, diff


# ---------------------------------------------------------------- both, and the result files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the golden release checkpoint (default: rebuilt into "
                    "runs/molmo2_release from tests/molmo2_release.py)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=4, help="timed requests per max_tokens and engine")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--name", default="molmo2_builtin_vs_ours_cpu")
    ap.add_argument("--vision", action="store_true", help="only the vision towers inside vLLM "
                    "(vision_check: seconds per call, features compared), written as NAME_vision")  # fmt: skip
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--vision-worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--vision-out", help=argparse.SUPPRESS)
    ap.add_argument("--gemm", action="store_true", help="only the GEMM check (gemm_check), "
                    "written as NAME_gemm")  # fmt: skip
    a = ap.parse_args()
    if a.gemm:
        from benchmarks.report import EXPERIMENT_RESULTS, write_results

        rows = gemm_check(max(a.repeats, 5))
        print("\n".join(json.dumps(r) for r in rows))
        write_results(f"{a.name}_gemm", rows, meta={"baseline": "torch F.linear"},
                      out_dir=EXPERIMENT_RESULTS)  # fmt: skip
        return
    if a.worker:
        worker(a.worker, a.model)
        return
    if a.vision_worker:
        vision_worker(a.vision_worker, a.model, a.vision_out, a.repeats)
        return

    from benchmarks.report import EXPERIMENT_RESULTS, describe_machine, write_results

    machine = describe_machine(with_vllm=True)
    model = Path(a.model) if a.model else _ROOT / "runs" / "molmo2_release"
    if not (model / "model.safetensors").exists():
        import molmo2_release

        molmo2_release.build_release_checkpoint(model)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if a.vision:
        rows, diff = vision_check(model, env, a.repeats)
        print("\n".join(json.dumps(r) for r in rows), f"\nfeatures max abs diff {diff:.3g}")
        meta = {"baseline": "ours", "request": "single_image golden prompt, max_tokens 1, after a warm-up",
                "features_max_abs_diff_ours_vs_builtin": diff, "engine_args": ENGINE_ARGS}  # fmt: skip
        write_results(f"{a.name}_vision", rows, meta=meta, out_dir=EXPERIMENT_RESULTS, machine=machine)
        return
    engines = []
    log_dir = Path(tempfile.mkdtemp(prefix="molmo2_builtin_vs_ours_"))
    try:
        for name in a.engines.split(","):  # started one after the other: start times alone
            engines.append(Engine(name, model, env, log_dir / f"{name}.log"))
            print(json.dumps(engines[-1].result, indent=1))
        times = {e.name: {n: [] for n in MAX_TOKENS} for e in engines}
        for r in range(a.repeats):
            for n in MAX_TOKENS:
                for e in engines if r % 2 == 0 else engines[::-1]:  # alternate who goes first
                    times[e.name][n].append(e.request(n))
    finally:
        for e in engines:
            e.close()
    rows = []
    for e in engines:
        e.result["single_image_latency"] = {
            f"max_tokens_{n}": {"median_s": round(statistics.median(t), 3), "all_s": [round(x, 3) for x in t]}
            for n, t in times[e.name].items()
        }
        rows.append(e.result)
        print(e.name, json.dumps(e.result["single_image_latency"]))
    meta = {
        "baseline": "ours (molmo_vllm.molmo2_model, what the plugin serves)",
        "candidate": "vLLM 0.32's built-in Molmo2ForConditionalGeneration behind our processor",
        "checkpoint": "tests/molmo2_release.py (golden: tests/golden/ai2_molmo2.json)",
        "engine_args": ENGINE_ARGS,
        "repeats": a.repeats,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),  # unset: vLLM sets torch threads to 1
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "latency_request": "single_image golden prompt (640x480), warm engine after one "
        "warm-up request, median; the engines' requests alternate (both engines alive)",
    }
    write_results(a.name, rows, meta=meta, out_dir=EXPERIMENT_RESULTS, machine=machine)


if __name__ == "__main__":
    main()
