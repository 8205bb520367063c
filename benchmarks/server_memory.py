"""Peak memory of `molmo serve` per worst accepted image request, against a baseline revision.

The same requests go to a server from this tree and to one from a baseline git revision (the
named baseline; default 075b00b, the server before its image-decoding hardening; an older revision would not
find its vLLM plugin under the entry point installed now), one server
at a time, same checkpoint and flags: a 2-image limit of 20 MP each, and the costliest images
that limit accepts (an RGBA PNG, a 16-bit PNG, a JPEG, a GIF, two RGB PNGs at 5000x4000).
Per request: the server process's peak RSS growth above its idle RSS (Linux: VmHWM after
writing 5 to /proc/PID/clear_refs, which resets the peak; the engine's processes are not
counted). Memory, not time, so a loaded machine changes the numbers little.

    python benchmarks/server_memory.py [--baseline-rev REV] [--model DIR]

Writes benchmarks/results/server_memory_cpu.{json,csv} with the machine. Without --model a
tiny random-weight checkpoint is written (by the baseline's code, which both servers load).
"""

from __future__ import annotations

import argparse
import base64
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import describe_machine, write_results  # noqa: E402
from benchmarks.servers import free_port  # noqa: E402

W, H = 5000, 4000  # 20 MP: the most the servers here accept per image
FLAGS = ["--enforce-eager", "--max-model-len", "3072", "--max-num-seqs", "8", "--max-images", "2",
         "--max-image-pixels", str(W * H), "--max-body-bytes", "4000000"]  # fmt: skip


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def cases() -> dict[str, list[bytes]]:
    return {
        "rgba_png": [encode(Image.new("RGBA", (W, H), (255, 0, 0, 128)))],
        "png_16_bit": [encode(Image.fromarray(np.full((H, W), 40000, dtype=np.uint16)))],
        "jpeg": [encode(Image.new("RGB", (W, H), "green"), "JPEG")],
        "gif": [encode(Image.new("P", (W, H)), "GIF")],
        "two_rgb_pngs": [encode(Image.new("RGB", (W, H), "blue"))] * 2,
    }


def body(images: list[bytes]) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b).decode()}}
             for b in images]  # fmt: skip
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}], "max_tokens": 2}


def status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def measure(repo: Path, model: str, requests: dict[str, list[bytes]]) -> dict[str, dict]:
    """Peak RSS growth (MB) and status of each request against a server run from `repo`."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="server_memory_", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--port", str(port), *FLAGS],
                            cwd=repo, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "VLLM_CPU_KVCACHE_SPACE": "1"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server from {repo} did not start; see {log.name}")
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=600) as c:
            warm = c.post("/v1/chat/completions", json=body([encode(Image.new("RGB", (64, 64)))]))
            assert warm.status_code == 200, warm.text
            for name, images in requests.items():
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                idle = status_bytes(proc.pid, "VmRSS")
                r = c.post("/v1/chat/completions", json=body(images))
                growth = (status_bytes(proc.pid, "VmHWM") - idle) / 2**20
                out[name] = {"status": r.status_code, "peak_rss_growth_mb": round(growth)}
                print(f"  {name:14s} HTTP {r.status_code}  peak RSS growth {growth:6.0f} MB", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-rev", default="075b00b", help="git revision of the baseline server")
    p.add_argument("--model", help="checkpoint folder (default: a fresh tiny checkpoint)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="server_memory_"))
    baseline = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(baseline), a.baseline_rev],
                   check=True)  # fmt: skip
    requests = cases()
    try:
        model = a.model or str(tmp / "tiny")
        if a.model is None:  # older code may not read newer config fields: the baseline writes it
            subprocess.run([sys.executable, "-c", "import sys; from molmo_model.checkpoint import "
                            "init_checkpoint; init_checkpoint('tiny', sys.argv[1])", model],
                           cwd=baseline, env={"PYTHONPATH": str(baseline), "PATH": "/usr/bin:/bin"}, check=True)  # fmt: skip
        print(f"baseline {a.baseline_rev}:")
        before = measure(baseline, model, requests)
        print("this tree:")
        after = measure(ROOT, model, requests)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    rows = [{"request": name, "baseline_mb": before[name]["peak_rss_growth_mb"],
             "baseline_status": before[name]["status"], "this_tree_mb": after[name]["peak_rss_growth_mb"],
             "this_tree_status": after[name]["status"]} for name in requests]  # fmt: skip
    meta = {"baseline_rev": a.baseline_rev, "image_size": [W, H], "flags": FLAGS}
    write_results("server_memory_cpu", rows, meta=meta, machine=describe_machine(with_vllm=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
