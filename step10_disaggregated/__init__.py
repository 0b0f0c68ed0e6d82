"""Step 10: prefill and decode on separate engines, the prompt's KV blocks handed over, exact."""
