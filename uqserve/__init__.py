"""uqserve command-line entry point (dispatches to training/ and service/ lazily)."""
