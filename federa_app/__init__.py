"""FeDeRA on Flower, the app: what the ServerApp and ClientApp run, all that travels to nodes.

Everything here is imported by `server_app.py` or `client_app.py` and goes into the app bundle
(FAB). It is grouped by what changes together: `method` (FeDeRA's SVD initialisation, the other
fine-tuning methods, the model, local training and export), `data` (assets, labelled text,
splits, partitions, a node's own rows), `federation` (the server's round engine, the client's
handlers, strategies, the wire, validation, privacy, checkpoints) and `records` (the run
directory, the edge-time model, update analysis). `config` (the run-config contract) and
`errors` are shared by all. Nothing here imports the operator's tools (`federa_ops`) or the
harness (`simulation`); docs/architecture.md has the full picture.
"""

__version__ = "0.1.0"
