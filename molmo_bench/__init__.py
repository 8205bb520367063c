"""`molmo bench`: a load benchmark for any OpenAI-compatible Molmo endpoint, pointing included.

A client of HTTP only (it imports neither server/ nor vLLM), so it measures our server, vLLM's
own OpenAI server or anything else that speaks the protocol. One module per concept:

    datasets.py   what is sent: synthetic scenes with known objects, a folder, JSONL rows
    generator.py  when it is sent: Poisson/gamma arrivals (open loop) or fixed concurrency
    client.py     one request, streamed, timed on the client per chunk (an injectable clock)
    metrics.py    the metric math: per-request records -> one `BenchmarkMetrics`
    runner.py     a run: warm-up, the load, a live progress bar, partial results on failure
    report.py     JSON / CSV / PNG / self-contained HTML, and `compare`
    cli.py        `molmo bench serve ...` and `molmo bench compare A.json B.json`

    molmo bench serve --base-url http://127.0.0.1:8000 --dataset synthetic \
        --num-requests 64 --concurrency 8 --max-tokens 32 --out bench/
"""
