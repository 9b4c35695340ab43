"""ppiad: LR-IAD (mask-free industrial anomaly detection by a reasoning multimodal LLM) in PaddlePaddle."""
__version__ = "0.1.0"
