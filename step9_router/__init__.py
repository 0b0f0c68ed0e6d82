"""Step 9: a prefix-aware router in front of many engines; Kubernetes places the replicas."""
