"""Generation (``generate``), the engine that schedules it (``engine``) and an OpenAI-compatible HTTP server
(``app`` and its wire ``schema``, which need the serve extra: fastapi, uvicorn, pydantic)."""

SERVE_EXTRA_HINT = "lowbit serve needs the serve extra: pip install 'lowbit[serve]'"
