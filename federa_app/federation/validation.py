"""Server-side checks on a train reply before any strategy aggregates it.

Flower's strategies trust their replies: one NaN poisons the global model, an extra tensor or a
missing `num-examples` makes FedAvg skip the whole round (InconsistentMessageReplies). A reply
that fails a check here is dropped (and counted) instead, so the honest replies still aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
from flwr.app import ArrayRecord, Message

WEIGHT_KEY = "num-examples"  # what Flower's strategies weight by (FedAvg's weighted_by_key)


def reject_reason(
    reply: Message,
    sent: dict[str, ArrayRecord],
    metric_keys: Collection[str],
    max_update_norm: float = 0.0,
) -> str | None:
    """Why `reply` must not be aggregated, or None if it is sound.

    `sent` holds the ArrayRecords the node was sent (by record name), `metric_keys` the keys an
    honest reply's MetricRecord has; `max_update_norm` > 0 bounds ||reply - sent|| (L2, all
    tensors together).
    """
    content = reply.content
    if set(content.array_records) != set(sent):
        return f"array records {sorted(content.array_records)} instead of {sorted(sent)}"
    if len(content.metric_records) != 1:
        return f"{len(content.metric_records)} metric records instead of 1"
    metrics = next(iter(content.metric_records.values()))
    if set(metrics) != set(metric_keys):
        extra, missing = set(metrics) - set(metric_keys), set(metric_keys) - set(metrics)
        return f"metric keys differ (extra {sorted(extra)}, missing {sorted(missing)})"
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"metric {key}={value!r} is not a finite number"
    if metrics[WEIGHT_KEY] <= 0:
        return f"{WEIGHT_KEY}={metrics[WEIGHT_KEY]!r} must be > 0"

    squared_norm = 0.0
    for name, sent_record in sent.items():
        record = content.array_records[name]
        if list(record) != list(sent_record):
            extra, missing = set(record) - set(sent_record), set(sent_record) - set(record)
            return f"tensor names differ (extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]})"
        for key, array in record.items():
            expected = sent_record[key]
            if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
                return (
                    f"tensor {key} is {array.dtype}{list(array.shape)}, "
                    f"sent {expected.dtype}{list(expected.shape)}"
                )
            values = array.numpy()
            if not np.isfinite(values).all():
                return f"tensor {key} has NaN or Inf values"
            if max_update_norm > 0:  # off by default: skip a pass over every weight (fft: all)
                squared_norm += float(np.sum((values.astype(np.float64) - expected.numpy()) ** 2))
    norm = math.sqrt(squared_norm)
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}"
    return None
