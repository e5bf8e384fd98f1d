"""The HTTP server: OpenAI- and Anthropic-compatible endpoints on one batched engine."""
