"""flywheel.serve: the OpenAI-compatible gateway in front of the model (`flywheel serve`).

app.py        the HTTP app: chat completions, models, feedback, health; API keys on every route
routing.py    alias -> version, sticky canary shares, registry changes picked up without a restart
backends.py   built-in (transformers + PEFT here) and proxy (vLLM or any OpenAI-compatible upstream)
capture.py    every answer to the store off the request path; spill.py when the store falls behind
feedback.py   signals on answers, the same ones the capture rules read
keys.py       one API key per client, stored as a sha256
protocol.py   the OpenAI wire format: validation, error bodies, chunks
server.py     uvicorn in the foreground or in a thread
"""
