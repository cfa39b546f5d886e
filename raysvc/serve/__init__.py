"""The OpenAI-compatible HTTP endpoint on Ray Serve (see `app.build_app`, `server`).

Tokenization, chat templates, incremental detokenization and stop strings live here, in
the ingress; workers see token ids only.
"""
