"""Vector exchange (local folder and Hugging Face Hub registries); filled in by the registry work."""
