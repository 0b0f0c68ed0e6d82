"""Step 8: speculative decoding (prompt lookup) on step 7's engine, exact."""
