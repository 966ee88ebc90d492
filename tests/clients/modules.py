"""Lightning modules written in the shapes of Lightning's own examples and demos (our own code, random data), wired
into lightning-tricks exactly as the README says: the mixin first, the user's steps kept, `tricks_loss` where the
cross-entropy was."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks import TricksMixin


class MetricsLogger(Logger):
    """Keeps every logged row in memory (what a user's TensorBoard or CSV logger would receive)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step or 0, dict(metrics)))

    def values(self, key: str) -> list[float]:
        return [row[key] for _, row in self.rows if key in row]


def images(n: int = 16, size: int = 32, classes: int = 5, seed: int = 0, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                    torch.randint(0, classes, (n,), generator=g)), batch_size=batch_size)


# ------------------------------------------------------------------------ computer_vision_fine_tuning.py's shape
class TransferLearningModel(TricksMixin, pl.LightningModule):
    """A torchvision ResNet-18 split into a feature extractor and a new head, its own step and MultiStepLR."""

    def __init__(self, classes: int = 5, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        backbone = torchvision.models.resnet18(weights=None)
        self.feature_extractor = nn.Sequential(*list(backbone.children())[:-1])
        self.fc = nn.Linear(512, classes)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feature_extractor(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        y_logits = self(x)
        loss = self.tricks_loss(y_logits, y)  # was: F.cross_entropy(y_logits, y)
        self.records.append((y_logits.detach(), y, loss.detach()))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 10], gamma=0.1)]


# ------------------------------------------------------------------------ imagenet.py's shape
class ImageNetLightningModel(TricksMixin, pl.LightningModule):
    """A ResNet with its own top-1/top-5 metrics on the target it receives, SGD and its own LambdaLR."""

    def __init__(self, classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(weights=None, num_classes=classes)
        self.train_acc1 = MulticlassAccuracy(num_classes=classes, top_k=1, average="micro")
        self.train_acc5 = MulticlassAccuracy(num_classes=classes, top_k=5, average="micro")
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, target = batch
        output = self(images)
        loss_train = self.tricks_loss(output, target)
        acc1, acc5 = self.train_acc1(output, target), self.train_acc5(output, target)
        self.log("train_loss", loss_train)
        self.log("train_acc1", acc1, on_step=True, prog_bar=True)
        self.log("train_acc5", acc5, on_step=True)
        self.records.append(dict(output=output.detach().float(), target=target, acc1=acc1, acc5=acc5))
        return loss_train

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.1 ** (epoch // 30))
        return [optimizer], [scheduler]


# ------------------------------------------------------------------------ generative_adversarial_net.py's shape
class Generator(nn.Module):
    def __init__(self, latent: int = 8, out: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, 32), nn.LeakyReLU(0.2), nn.Linear(32, out), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, inp: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inp, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GAN(pl.LightningModule):
    """Two optimizers, manual optimization, two ``step()``s per batch; ``training_step(self, batch)``."""

    def __init__(self, latent: int = 8, poison_discriminator_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent, self.poison_at = latent, poison_discriminator_at
        self.generator, self.discriminator = Generator(latent), Discriminator()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch: Any) -> None:
        imgs, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(imgs.shape[0], self.latent)
        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), torch.ones(imgs.shape[0], 1))
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        real = F.binary_cross_entropy_with_logits(self.discriminator(imgs), torch.ones(imgs.shape[0], 1))
        fake = F.binary_cross_entropy_with_logits(self.discriminator(self(z).detach()), torch.zeros(imgs.shape[0], 1))
        d_loss = (real + fake) / 2
        if self.poison_at is not None and self.trainer.fit_loop.epoch_loop.batch_idx == self.poison_at:
            d_loss = d_loss * float("nan")
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
        return [opt_g, opt_d]


def gan_data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.rand(n, 16, generator=g) * 2 - 1, torch.zeros(n)), batch_size=8)


# ------------------------------------------------------------------------ reinforce_learn_Qnet.py's shape
class DQNLightning(TricksMixin, pl.LightningModule):
    """A 5-tuple batch of transitions, an MSE loss, no validation loop."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.target_net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.target_net.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        states, actions, rewards, dones, next_states = batch
        state_action_values = self.net(states).gather(1, actions.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            next_state_values = self.target_net(next_states).max(1)[0] * (1 - dones)
        expected = next_state_values * 0.99 + rewards
        loss = F.mse_loss(state_action_values, expected)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)


def transitions(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(4)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g),
                                    torch.randn(n, generator=g), torch.zeros(n), torch.randn(n, 4, generator=g)),
                      batch_size=8)
