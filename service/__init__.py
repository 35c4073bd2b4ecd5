"""uqserve's HTTP service: FastAPI app factory over the multi-LoRA uncertainty engine."""
