"""Model building blocks: each file holds one concept's pure math plus the NNX module owning its
parameters."""
