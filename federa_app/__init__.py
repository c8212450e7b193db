"""FeDeRA on Flower: federated fine-tuning with SVD-initialised LoRA adapters."""

__version__ = "0.1.0"
