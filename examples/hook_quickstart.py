"""A Flower app in the layout of Flower's own quickstart (its own model, its own ClientApp sending
ordinary replies, its own ServerApp with FedAvg), with this project's purification hook wrapped
around its strategy. Nothing else of the project is used: the clients are the app's own.

    python examples/hook_quickstart.py            # 4 clients, one of them plants a 2x2 patch, 6 rounds

The final global model comes back scanned (data-free) and, when the scan flags it, purified by DHBE
on Ray Train; the verdict line is printed. tests/test_purify_hook.py runs `run()` at a small size.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from defense.models import MODELS                       # noqa: E402  (the registry the hook builds networks from)
from defense.spec import InputSpec                      # noqa: E402
from federated.purification import PurifyingStrategy    # noqa: E402

SPEC = InputSpec(channels=1, height=8, width=8, num_classes=10, mean=(0.3,), std=(0.35,))
TARGET = 0


class QuickstartNet(nn.Module):
    """The app's own small network (8x8 grey digits)."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        self.features = nn.Sequential(nn.Conv2d(spec.channels, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32 * 4, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std).flatten(1))


if "quickstart-net" not in MODELS.names():   # register the network once, so the hook can rebuild it
    MODELS.register("quickstart-net")(QuickstartNet)


def load_partition(partition: int, partitions: int, poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's share of scikit-learn's digits; a poisoning client stamps a white 2x2 patch in the
    bottom-right corner of half its images and labels them TARGET."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = np.random.default_rng(0).permutation(len(labels))[partition::partitions]
    images, labels = images[order].clone(), labels[order].clone()
    if poison:
        half = torch.arange(len(labels)) % 2 == 0
        images[half, :, -2:, -2:] = 1.0
        labels[half] = TARGET
    return images, labels


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model = QuickstartNet(SPEC)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    images, labels = load_partition(partition, partitions, poison=partition == 0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]) * 100 + partition)
    for _ in range(2):
        for batch in torch.randperm(len(labels), generator=generator).split(32):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimiser.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": len(labels)})})
    return Message(content=reply, reply_to=msg)


RESULT: dict[str, Any] = {}   # what the server app hands back to run() (same process in a simulation)


def server_app_for(rounds: int, recipe=None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = PurifyingStrategy(FedAvg(fraction_evaluate=0.0), model_name="quickstart-net", spec=SPEC,
                                     final_round=rounds, recipe=recipe)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(QuickstartNet(SPEC).state_dict()),
                                num_rounds=rounds)
        RESULT.update(arrays=result.arrays, purifications=strategy.purifications)

    return app


def run(clients: int = 4, rounds: int = 6, recipe=None) -> dict[str, Any]:
    """The app on Flower's simulation engine; returns the final arrays and the hook's record."""
    RESULT.clear()
    run_simulation(server_app=server_app_for(rounds, recipe), client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "logging_level": "ERROR"}})
    return dict(RESULT)


def attack_success(arrays: ArrayRecord) -> float:
    """Share of non-target digits sent to TARGET when the app's patch is stamped (the app's own check)."""
    model = QuickstartNet(SPEC).eval()
    model.load_state_dict(arrays.to_torch_state_dict())
    images, labels = load_partition(0, 1, poison=False)
    keep = labels != TARGET
    stamped = images[keep].clone()
    stamped[:, :, -2:, -2:] = 1.0
    with torch.no_grad():
        return float((model(stamped).argmax(1) == TARGET).float().mean())


if __name__ == "__main__":
    outcome = run()
    print(f"attack success of the final global model: {100 * attack_success(outcome['arrays']):.1f}%")
