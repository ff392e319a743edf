"""Model weights: local, bundled, Hugging Face cache or Hub; sha256 checks; safetensors only."""
