"""Flower ServerApp: thin; the work is in `federa_app.federation.server`."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federa_app.federation.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FeDeRA (or another method) for `num-server-rounds` and write the run directory."""
    run_server(grid, context)
