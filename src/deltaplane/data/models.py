"""The small CNN the default simulation trains on 8×8 digits (18,346 parameters).

Small on purpose: a round of 20 clients must take well under a second on a 2-core CPU, and the model must be
big enough that a 1% top-k update is a real compression problem (a few hundred values per client per round).
Attribute names are the state-dict keys (``conv1.weight`` ...), so deltas and payloads read naturally.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deltaplane.data.digits import NUM_CLASSES

__all__ = ["DigitsCNN", "build_model"]


#: which client of a pair each input channel of a paired conv1 group belongs to (:meth:`DigitsCNN.forward_stacked`)
_PAIR = torch.eye(2)


class _ClientMajor(torch.autograd.Function):
    """A channels-last ``(B, C, H, W)`` tensor copied to the plain (contiguous) layout, whose backward pass
    copies the gradient back to channels-last *as its own copy kernel*.

    ``x.contiguous()`` alone does the forward copy, but its backward passes the gradient through in the
    plain layout, so the layout change lands on the next backward kernel: max-pooling's backward, or a
    ReLU's ``threshold_backward`` between them, then reads one operand channels-last and the other plain,
    element by element (DigitsCNN, ten clients: 188 µs of a 2.3 ms step for a 164k-element ReLU backward
    that takes 14 µs with matching layouts; the two copies take 67 µs).
    """

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class DigitsCNN(nn.Module):
    """conv 1→8 3×3 → ReLU → conv 8→16 3×3 → ReLU → maxpool 2 → fc 256→64 → ReLU → fc 64→10."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)  # 8·9 + 8 = 80
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)  # 16·8·9 + 16 = 1,168
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)  # 256·64 + 64 = 16,448
        self.fc2 = nn.Linear(64, num_classes)  # 64·10 + 10 = 650

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))  # (B, 8, 8, 8)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 16, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, 64)
        return self.fc2(x)  # (B, 10) logits

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``(K, B, 10)`` of ``K`` copies of this network with stacked weights ``params[name]`` of shape
        ``(K, *shape)`` on their own inputs ``x`` of shape ``(K, B, 1, 8, 8)``; copy ``k`` computes exactly
        what :meth:`forward` computes with weights ``params[name][k]`` on ``x[k]``.

        Why not ``vmap(functional_call(...))``: the batched engine trains all clients of a round as one
        computation, and on CPU the vmapped convolution's backward pass plus pooling on its output layout cost
        about 2.5× this. Here the copies share one *grouped* convolution (client ``k`` owns channel group
        ``k``) in channels-last layout, which oneDNN runs fastest for grouped convolutions; ReLU follows the
        pooling (``relu(max(z)) = max(relu(z))`` exactly, on a quarter of the values) and one explicit copy to
        each client's row (:class:`_ClientMajor`); the dense layers are batched matrix products. One step of 20
        clients takes about half the time of one plain model on all 640 samples (``benchmarks/sim_speed.py``).
        """
        cl = torch.channels_last
        k, b = x.shape[0], x.shape[1]
        # (B, K·1, 8, 8): client k's image is channel group k
        h = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:]).contiguous(memory_format=cl)
        for name in ("conv1", "conv2"):
            conv: nn.Conv2d = getattr(self, name)
            weight = params[f"{name}.weight"].reshape(-1, *conv.weight.shape[1:])  # (K·out, in, 3, 3)
            groups = k
            if conv.in_channels == 1 and k % 2 == 0:
                # One input channel per group: oneDNN pads a group's channels to blocks of 16, so a group of
                # 1 → 8 channels does 16 × 16 channels' work. Two clients per group (a block-diagonal
                # 2 → 16 weight; the same output channels in the same order) halve that: the same bits
                # (the zero blocks add exact zeros), 276 → 226 µs forward and backward at K = 10.
                out, ks = conv.out_channels, conv.kernel_size
                pair = weight.reshape(k // 2, 2, out, 1, *ks) * _PAIR.view(1, 2, 1, 2, 1, 1)
                weight, groups = pair.reshape(k * out, 2, *ks), k // 2
            h = nn.functional.conv2d(
                h,
                weight.contiguous(memory_format=cl),
                params[f"{name}.bias"].reshape(-1),
                padding=1,
                groups=groups,
            )
            if name == "conv1":
                h = torch.relu(h)
        # (B, K·16, 4, 4) channels-last → (B, K, 256): each client's row, flattened as in forward(); ReLU after
        # the copy, on the layout fc1 reads (the same values: the copy moves them, ReLU is element-wise)
        n_features = self.conv2.out_channels * (h.shape[-2] // 2) * (h.shape[-1] // 2)
        h = torch.relu(_ClientMajor.apply(self.pool(h)).view(b, k, n_features))  # sizes, not -1: B may be 0
        h = h.transpose(0, 1)  # (K, B, 256)
        h = torch.relu(
            torch.baddbmm(params["fc1.bias"].unsqueeze(1), h, params["fc1.weight"].transpose(1, 2))
        )
        return torch.baddbmm(params["fc2.bias"].unsqueeze(1), h, params["fc2.weight"].transpose(1, 2))


def build_model(seed: int) -> DigitsCNN:
    """A freshly initialised :class:`DigitsCNN` whose weights depend only on ``seed``.

    PyTorch layers draw their initial weights from the global RNG; forking it keeps the caller's global
    random state untouched while making the initial model a pure function of ``seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN()
