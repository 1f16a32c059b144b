"""lmppl: probabilistic inference in language models."""
