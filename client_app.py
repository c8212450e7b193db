"""Flower ClientApp: thin; the work is in `federa_app.client`."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federa_app.client import handle_train
from federa_app.privacy import dp_client_mod

# dp=client-fixed/client-adaptive clip each train reply here; the mod passes through otherwise.
app = ClientApp(mods=[dp_client_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter (or model) on this node's data and send it back."""
    return handle_train(msg, context)
