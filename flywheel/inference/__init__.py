"""Running models: base-model and adapter folders (folders), and LocalModel for inference (local_model)."""
