"""braid: distributed pretraining for hybrid language models."""
