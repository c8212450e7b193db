"""Federation: how a round runs between the server and the nodes.

The ServerApp's round engine and its preparation and finish, the ClientApp's message handlers
and the node's warm worker, the aggregation strategies (Flower's, wrapped to keep dtypes, and
svd-avg), what goes on the wire and how a reply is validated before it counts, differential
privacy, and checkpoints for resume. Changes when the exchange between server and nodes does.
"""
