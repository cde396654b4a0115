"""A plain Flax NNX transformer that switches to ``embed.Embed`` by changing one import."""
