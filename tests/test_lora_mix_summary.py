"""benchmarks/lora_mix.py's summary of its bench calls (no server): medians per case, ratios to
the base alone, and each mix against the base-only call before it on the same server start.

    pytest tests/test_lora_mix_summary.py -q
"""

from __future__ import annotations

import pytest

from benchmarks.lora_mix import case_rows


def call(case: str, start: int, tok_s: float, ttft: float = 100.0, tpot: float = 4.0) -> dict:
    server = "base" if case == "base" else "lora4"
    return {"case": case, "server": server, "start": start, "models": ["tiny"], "output_tok_s": tok_s,
            "ttft_median_ms": ttft, "tpot_median_ms": tpot, "e2e_median_ms": 200.0, "failed": 0,
            "load_average_at_start": [1.0, 1.0, 1.0]}  # fmt: skip


def test_medians_ratios_and_same_start_pairs() -> None:
    calls = [call("base", 0, 500), call("base", 0, 900), call("base", 3, 600),
             # start 1: base-only then mix, twice; start 2: once (a slower moment for both)
             call("lora4_base_only", 1, 600), call("mix4", 1, 480, tpot=6.0),
             call("lora4_base_only", 1, 500), call("mix4", 1, 450, tpot=5.0),
             call("lora4_base_only", 2, 300), call("mix4", 2, 240, tpot=8.0)]  # fmt: skip
    rows = {r["case"]: r for r in case_rows(calls)}
    base, only, mix = rows["base"], rows["lora4_base_only"], rows["mix4"]
    assert (base["output_tok_s"], base["output_tok_s_best"], base["calls"]) == (600, 900, 3)
    assert (only["output_tok_s"], only["ratio_to_base"], only["ratio_to_base_only_same_start"]) == (500, 0.833, None)
    # pairs 480/600, 450/500, 240/300 -> 0.8, 0.9, 0.8: the median, whatever each start's speed
    assert mix["ratio_to_base_only_same_start"] == pytest.approx(0.8)
    assert (mix["output_tok_s"], mix["ratio_to_base"], mix["ratio_to_base_best"]) == (450, 0.75, 0.533)
    assert (mix["tpot_median_ms"], mix["tpot_ratio_to_base"]) == (6.0, 1.5)
    assert mix["output_tok_s_calls"] == [480, 450, 240]
