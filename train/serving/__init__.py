"""Serving many adapters from one base: batched generation (``engine``), the adapter registry and the
OpenAI-style HTTP app behind ``mmtune serve`` (``app``; FastAPI is imported only there)."""
