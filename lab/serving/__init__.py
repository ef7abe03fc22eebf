"""Serving: an OpenAI-compatible client (``client``) and a llama.cpp ``llama-server`` launcher (``llama_server``)."""
