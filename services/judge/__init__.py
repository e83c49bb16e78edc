"""The judge: a verdict per conversation (deterministic checks + an LLM judge), stored beside its transcript."""
