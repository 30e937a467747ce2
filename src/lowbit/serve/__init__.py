"""Generation (``generate``) and an OpenAI-compatible HTTP server (``server``, needs fastapi + uvicorn)."""
