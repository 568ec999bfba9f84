"""Analysis of adapters and mixtures: what an adapter did to a model, and plots of it."""
