"""Serving LingBot-VA to robots: inference bundles, the KV-cache runtime and the websocket server.

    bundle.py          `lbva export inference`: checkpoint -> bf16 weights + bundle.json; load_bundle
    runtime.py         the chunked autoregressive loop (spec 4): video then inverse-dynamics actions,
                       partial denoising, ground-truth feedback, forward-dynamics-grounded async mode
    cached_forward.py  one model forward over token groups through the KV cache
    kv_cache.py        per-layer K/V slots with predicted / ground-truth flags and FIFO eviction
    settings.py        InferenceSettings (steps, shifts, guidance, K, window, stop level, FDM steps)
    sampling.py        sigma schedules with a stop level, Euler step, classifier-free guidance
    observations.py    camera images -> latents (streaming), prompts -> text features, action codec
    protocol.py        msgpack + numpy payloads and request validation (spec 4.4)
    server.py          `lbva serve`: the websocket server; client.py: a client that follows it
    cli.py             register_export (export inference) and register (serve)
"""
