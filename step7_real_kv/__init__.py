"""Step 7: continuous batching over a paged KV cache, with prefix caching."""
