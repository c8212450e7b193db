"""Flower ClientApp: thin; the work is in `federa_app.federation.client`, here or in the
node's warm worker.

A node may run a warm worker next to its SuperNode (`federa worker`, node config
`warm-worker="/path/node.sock"`) that keeps torch, transformers and peft loaded between messages:
this process then forwards the train message to it and never imports them. Without one, or when
it cannot serve the message (one warning line says why), the message is handled here.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federa_app.federation.privacy import dp_client_mod
from federa_app.federation.warm_worker import handle_warm

# dp=client-fixed/client-adaptive clip each train reply here; the mod passes through otherwise.
app = ClientApp(mods=[dp_client_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter (or model) on this node's data and send it back."""
    reply = handle_warm(msg, context)
    if reply is None:
        from federa_app.federation.client import (
            handle_train,  # torch, transformers, peft: seconds to import
        )

        reply = handle_train(msg, context)
    return reply
