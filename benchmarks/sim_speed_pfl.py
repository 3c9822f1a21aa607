"""pfl-research (Apple's ``pfl``) on the default digits workload, run in a throwaway venv of its own.

pfl pins ``dp-accounting<0.6``, which the project's own venv must not get, so this script imports nothing from
deltaplane: ``benchmarks/sim_speed.py --pfl-python PATH`` writes the same shards, test set and initial weights
to an ``.npz`` and runs this file with that interpreter. The model is DigitsCNN, re-declared layer for layer.
Prints one JSON line: start-up seconds, per-round seconds, final test accuracy.

Usage (normally via sim_speed.py): /tmp/pflvenv/bin/python benchmarks/sim_speed_pfl.py DATA.npz ROUNDS
"""

from __future__ import annotations

import itertools
import json
import sys
import time

t_start = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402
from torch import nn  # noqa: E402


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)

    def loss(self, x, y, eval=False):
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        from pfl.metrics import Weighted

        self.eval()
        correct = (self(x).argmax(1) == y).sum().item()
        return {"accuracy": Weighted(correct, len(y))}


class Clock(TrainingProcessCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.stamps.append(time.perf_counter())
        return False, Metrics()


def main() -> None:
    path, rounds = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    d = np.load(path)
    n_clients = int(d["n_clients"])
    users = {c: [torch.from_numpy(d[f"x{c}"]), torch.from_numpy(d[f"y{c}"])] for c in range(n_clients)}
    train = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(range(n_clients))))
    val = FederatedDataset.from_slices(
        {0: [torch.from_numpy(d["test_x"]), torch.from_numpy(d["test_y"])]}, get_user_sampler("random", [0])
    )
    net = DigitsCNN()
    net.load_state_dict({k[len("init.") :]: torch.from_numpy(d[k]) for k in d.files if k.startswith("init.")})
    model = PyTorchModel(
        model=net,
        local_optimizer_create=lambda params, lr: torch.optim.SGD(
            params, lr=lr, momentum=float(d["momentum"])
        ),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    clock = Clock()
    t_ready = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds,
            evaluation_frequency=1,
            train_cohort_size=n_clients,
            val_cohort_size=1,
        ),
        backend=SimulatedBackend(training_data=train, val_data=val),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_batch_size=int(d["batch_size"]),
            local_num_epochs=int(d["epochs"]),
            local_learning_rate=float(d["lr"]),
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=10_000),
        callbacks=[clock],
        send_metrics_to_platform=False,
    )
    stamps = [t_ready, *clock.stamps]
    per_round = [b - a for a, b in itertools.pairwise(stamps)]
    with torch.no_grad():
        acc = float(
            (net(torch.from_numpy(d["test_x"])).argmax(1) == torch.from_numpy(d["test_y"])).float().mean()
        )
    print(json.dumps({"startup_s": t_ready - t_start, "per_round_s": per_round, "test_accuracy": acc}))


if __name__ == "__main__":
    main()
