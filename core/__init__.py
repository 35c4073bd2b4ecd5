"""uqserve's shared contract: answer space and prompt, bundle format, uncertainty math."""
