"""A tiny causal language model with a tied ``MyEmbed`` input and output."""
