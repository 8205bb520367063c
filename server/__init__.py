"""Molmo's OpenAI-compatible HTTP server, with a pointing API, on vLLM's async engine.

    python -m server --model DIR [--port 8000] [--api-key KEY] ...   (or `molmo serve ...`)

Files, read in this order:
  config.py    ServerConfig: every knob of `molmo serve`, validated
  protocol.py  pydantic request/response models (OpenAI's chat schema + our `points` field)
  errors.py    APIError and the OpenAI-shaped error body
  images.py    image_url parts -> decoded PIL images: allowed formats, header checks, a
               bounded decode pool; optional http(s) fetch to checked addresses only
  points.py    model text -> points in pixels of the image they refer to
  metrics.py   Prometheus metrics of the server
  engine.py    building vLLM's AsyncLLM and reading the model folder
  outputs.py   engine outputs and errors -> usage, logprobs, finish reasons, HTTP statuses
  serving.py   the serving layer: request -> engine -> response, stream or error
  app.py       FastAPI app: routes, auth / body-size middleware, error handlers
  cli.py       argument parsing, default model, uvicorn with graceful shutdown

The server knows nothing of training; it builds prompts with `molmo_vllm.prompt` (the one
prompt builder, shared with `molmo eval` and the tests) and uses `molmo_model` only for image
loading, token counting and points; the model itself comes through vLLM's plugin.
"""
