"""Server-side checks on every client reply before aggregation: a hostile client controls its whole reply.

A reply is accepted only in the one layout aggregation expects, and is rebuilt in it (`ReplyChecker.normalise`):
- exactly two records: an ArrayRecord "arrays" with exactly the global model's keys, shapes and dtypes,
  only finite values, and an update norm ||L - G|| of at most `max_relative_norm` * ||G|| and above
  zero as float32 arithmetic sees it (a model sent back unchanged, or changed only below float32's
  range, carries no training, and Flower's clipping divides by that norm); and a
  MetricRecord "metrics" with exactly the keys `METRIC_KEYS`: "client-id" an integer in
  0..clients-1 (one per node for the whole run, and one node per id) and "num-examples" an integer
  in 1..`MAX_EXAMPLES`;
- its aggregation weight is not the client's word: `known` caps "num-examples" at the size of the
  partition the server itself assigned to that client id (in this simulation the server knows every
  partition); `equal` gives every accepted reply weight 1 (for a server that knows nothing of the
  clients' data). Either way one accepted reply moves a weighted average by at most its weight
  share times the norm bound.
Anything else is rejected with a reason (`RejectedReply`); the round goes on without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from federated.config import WEIGHTINGS
from defense.errors import shown

METRIC_KEYS = ("client-id", "num-examples")
MAX_EXAMPLES = 10**9


class RejectedReply(ValueError):
    """A client reply the server does not aggregate; the message is the logged reason."""


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RejectedReply(f"{name} {value!r:.40} is not an integer")
    if not low <= int(value) <= high:
        raise RejectedReply(f"{name} {int(value)} is outside {low}..{high}")
    return int(value)


def check_arrays(record: Any, reference: dict[str, np.ndarray], max_relative_norm: float) -> dict[str, np.ndarray]:
    """The update's arrays, checked against the global model `reference`, as new numpy arrays."""
    if not isinstance(record, ArrayRecord):
        raise RejectedReply(f"'arrays' is a {type(record).__name__}, not an ArrayRecord")
    try:
        arrays = {key: np.array(record[key].numpy()) for key in record.keys()}
    except Exception as exc:
        raise RejectedReply(f"unreadable arrays ({type(exc).__name__})") from None
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or extra:
        raise RejectedReply(f"keys differ (missing {sorted(missing)[:2]}, extra {sorted(map(repr, extra))[:2]})")
    squared_update, squared_global, native_norms = 0.0, 0.0, []
    for key, ref in reference.items():
        value = arrays[key]
        if value.shape != ref.shape:
            raise RejectedReply(f"{key}: shape {value.shape} != {ref.shape}")
        if value.dtype != ref.dtype:
            raise RejectedReply(f"{key}: dtype {value.dtype} != {ref.dtype}")
        if value.dtype.kind == "f":
            if not np.isfinite(value).all():
                raise RejectedReply(f"{key}: non-finite values")
            squared_update += float(np.square(value.astype(np.float64) - ref.astype(np.float64)).sum())
            with np.errstate(under="ignore", over="ignore"):   # per array, in the array's dtype, as Flower's clipping
                native_norms.append(np.linalg.norm((value - ref).ravel()))
            squared_global += float(np.square(ref.astype(np.float64)).sum())
        elif not np.array_equal(value, ref):
            raise RejectedReply(f"{key}: integer state differs from the global model's")
    norm, reference_norm = math.sqrt(squared_update), math.sqrt(squared_global)
    if not math.isfinite(norm) or norm > max_relative_norm * max(reference_norm, 1e-12):
        raise RejectedReply(f"update norm {norm:.3g} exceeds {max_relative_norm} x global norm {reference_norm:.3g}")
    with np.errstate(under="ignore", over="ignore"):   # ... and combined as it does (a float64 zero is one too)
        native_norm = float(np.sqrt(sum(n ** 2 for n in native_norms)))
    if native_norm == 0:
        raise RejectedReply(f"update norm {norm:.3g} is zero in {next(iter(reference.values())).dtype} "
                            f"(the global model sent back unchanged): no training to aggregate")
    return arrays


@dataclass
class ReplyChecker:
    """What the server knows: the global model the replies must be updates of, the number of
    clients, each client's partition size (for `known` weights) and which node speaks for which id."""

    clients: int
    max_relative_norm: float = float("inf")
    weighting: str = "known"
    partition_sizes: Optional[Sequence[int]] = None
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    node_of_client: dict[int, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"client weighting must be one of {', '.join(WEIGHTINGS)}, got {shown(self.weighting)}")
        if self.weighting == "known" and (self.partition_sizes is None or len(self.partition_sizes) != self.clients):
            raise ValueError("client weighting 'known' needs the size of every client's partition")

    def expect(self, arrays: ArrayRecord) -> None:
        self.reference = {k: np.array(arrays[k].numpy()) for k in arrays.keys()}

    def normalise(self, content: Any, node: Any) -> tuple[RecordDict, int]:
        """The reply rebuilt in the expected layout with the server's weight, and its client id;
        raises RejectedReply."""
        if not isinstance(content, RecordDict):
            raise RejectedReply(f"content is a {type(content).__name__}, not a RecordDict")
        if sorted(content.keys()) != ["arrays", "metrics"]:
            raise RejectedReply(f"records {sorted(map(repr, content.keys()))[:4]} are not exactly 'arrays' and 'metrics'")
        metrics = content["metrics"]
        if not isinstance(metrics, MetricRecord):
            raise RejectedReply(f"'metrics' is a {type(metrics).__name__}, not a MetricRecord")
        if sorted(metrics.keys()) != sorted(METRIC_KEYS):
            raise RejectedReply(f"metric keys {sorted(map(repr, metrics.keys()))[:4]} are not exactly {list(METRIC_KEYS)}")
        client_id = _integer(metrics["client-id"], "client-id", 0, self.clients - 1)
        examples = _integer(metrics["num-examples"], "num-examples", 1, MAX_EXAMPLES)
        speaker = self.node_of_client.get(client_id)
        if speaker is not None and speaker != node:
            raise RejectedReply(f"client-id {client_id} already belongs to node {speaker}")
        claimed = [c for c, n in self.node_of_client.items() if n == node and c != client_id]
        if claimed:
            raise RejectedReply(f"node {node} spoke as client-id {claimed[0]} before, now {client_id}")
        arrays = check_arrays(content["arrays"], self.reference, self.max_relative_norm)
        self.node_of_client[client_id] = node
        weight = 1
        if self.weighting == "known":
            weight = min(examples, int(self.partition_sizes[client_id]))
            if weight < 1:
                raise RejectedReply(f"client-id {client_id} was assigned no data")
        rebuilt = RecordDict({
            "arrays": ArrayRecord({k: torch.from_numpy(arrays[k]) for k in self.reference}),
            "metrics": MetricRecord({"client-id": client_id, "num-examples": weight}),
        })
        return rebuilt, client_id
