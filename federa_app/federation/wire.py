"""What crosses the wire: a Grid wrapper that ships FeDeRA's factors once, counts every byte and
drops the replies that fail validation.

Flower's strategies talk to the nodes only through the Grid, so wrapping it sees every message of
every strategy without touching the strategies themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

INIT_FACTORS_KEY = "federa-init"
# A train reply's ConfigRecord describing the node (client.node_report); recorded per round and
# taken off the reply before any strategy sees it.
NODE_REPORT_KEY = "federa-node"


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them (array payloads + names + scalars)."""
    return sum(record.count_bytes() for record in content.values())


@dataclass
class Traffic:
    """What one round sent and received."""

    bytes_down: int = 0
    bytes_up: int = 0
    reply_metrics: list[dict[str, float]] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (node, reason)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (node, why), validation
    # Per replying client: [ClientApp seconds, bytes it sent, bytes it was sent] (edge time model).
    client_costs: list[list[float]] = field(default_factory=list)
    replies_at: float | None = None  # when the last non-empty exchange returned (perf_counter)
    # Per replying node: {"node": id, **its node report, "client_seconds": ...}.
    nodes: list[dict] = field(default_factory=list)


# Gets a reply and the ArrayRecords its node was sent; returns why to reject it, or None.
ReplyCheck = Callable[[Message, dict[str, ArrayRecord]], str | None]


class WireRecorder(Grid):
    """Delegates to the real Grid; adds the initial factors to a node's first message; counts.

    `send_and_receive` returns only the replies fit to aggregate: error replies are recorded as
    failures, replies `check` objects to as rejected (Flower's DP wrappers skip a whole round
    when a single reply is an error). A node is marked as holding the factors only once it has
    replied without error, so a node whose first round failed gets them again.
    """

    def __init__(
        self,
        grid: Grid,
        init_factors: ArrayRecord | None = None,
        on_message: Callable[[dict], None] | None = None,
        check: ReplyCheck | None = None,
    ) -> None:
        self._grid = grid
        self._on_message = on_message  # gets one dict per message sent or received
        self._check = check
        self._init_factors = init_factors
        self._nodes_with_factors: set[int] = set()
        self.traffic = Traffic()

    def next_round(self) -> Traffic:
        """Close the current round's record and start a new one; returns the closed one."""
        closed, self.traffic = self.traffic, Traffic()
        return closed

    # The Grid interface, delegated.
    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run type
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send (adding factors where a node lacks them), count, return the sound replies."""
        outgoing = [self._with_factors(m) for m in messages]
        sent: dict[int, int] = {}
        sent_arrays: dict[int, dict[str, ArrayRecord]] = {}
        for message in outgoing:
            node, size = message.metadata.dst_node_id, content_bytes(message.content)
            sent[node] = sent.get(node, 0) + size
            sent_arrays[node] = {
                key: record
                for key, record in message.content.array_records.items()
                if key != INIT_FACTORS_KEY
            }
            self.traffic.bytes_down += size
            self._report("down", node, message.content)
        replies = list(self._grid.send_and_receive(outgoing, timeout=timeout))
        if outgoing:
            self.traffic.replies_at = time.perf_counter()
        # The SuperLink answers for a node that went silent (src = the SuperLink itself): the
        # node a reply is about is the destination of the message it replies to.
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing}
        answered = set()
        sound = []
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                self.traffic.failures.append((node, short_reason(reply.error.reason)))
                continue
            self._nodes_with_factors.add(node)
            report = reply.content.config_records.get(NODE_REPORT_KEY)
            if report is not None:  # describes the node; no strategy should see it
                del reply.content[NODE_REPORT_KEY]
            size = content_bytes(reply.content)
            self.traffic.bytes_up += size
            self._report("up", node, reply.content)
            reason = self._check(reply, sent_arrays.get(node, {})) if self._check else None
            if reason is not None:
                self.traffic.rejected.append((node, reason))
                continue
            sound.append(reply)
            seconds = 0.0
            for metrics in reply.content.metric_records.values():
                self.traffic.reply_metrics.append(dict(metrics))
                seconds = float(metrics.get("client_seconds", seconds))
            self.traffic.client_costs.append([seconds, size, sent.get(node, 0)])
            report = {"node": node, **dict(report or {}), "client_seconds": seconds}
            self.traffic.nodes.append(report)
        for message in outgoing:
            if message.metadata.dst_node_id not in answered:
                self.traffic.failures.append((message.metadata.dst_node_id, "no reply (timeout)"))
        return sound

    def _report(self, direction: str, node: int, content: RecordDict) -> None:
        if self._on_message is None:
            return
        arrays = {
            key: {name: [list(arr.shape), arr.dtype, len(arr.data)] for name, arr in rec.items()}
            for key, rec in content.array_records.items()
        }
        self._on_message(
            {
                "direction": direction,
                "node": node,
                "bytes": content_bytes(content),
                "arrays": arrays,
            }
        )

    def _with_factors(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if self._init_factors is None or node in self._nodes_with_factors:
            return message
        content = RecordDict({**message.content, INIT_FACTORS_KEY: self._init_factors})
        return Message(
            content,
            dst_node_id=node,
            message_type=message.metadata.message_type,
            group_id=message.metadata.group_id,
        )


def short_reason(reason: str) -> str:
    """One line from an error reply's reason (Flower wraps the ClientApp's traceback in it)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Message:" in line:
            return line.split("Message:", 1)[1].strip().rstrip("'>")[:300]
    return (lines[-1] if lines else "unknown error")[:300]
