"""The OpenAI-compatible HTTP server and web chat (FastAPI); it only calls nanoseek.infer."""
