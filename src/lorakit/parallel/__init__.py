"""The ranks of a ``torch.distributed`` run and the collectives shared by the trainer and the data-driven inits."""
