"""Attribute networks: a CNN with one classification head per attribute group, trained on a
catalogue's train split and measured on its held-out split.

Two roles, two architectures, two training runs, one implementation:
  embedder  `mobilenet_v2` (ImageNet start, fine-tuned): its 256-d penultimate layer becomes an
            in-domain retrieval embedder (`atelier index --embedder PATH`)
  judge     `judge_cnn` (a plain VGG-style CNN from scratch): grades generated images in
            `atelier eval`, so the service is never graded by its own eyes

Saved as an artifact folder: config.json (architecture, input size, schema) +
weights.safetensors + manifest.json (training record with held-out accuracy per group).
Single-label groups use softmax + cross-entropy; multi-label groups sigmoid + BCE.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from atelier import artifacts
from atelier.catalog.catalogue import Catalogue
from atelier.catalog.schema import AttributeSchema
from atelier.indexer.backbone import network_input
from atelier.pretrained import MOBILENET_V2_WIDTH, mobilenet_v2_features
from atelier.progress import progress_bar
from atelier.registry import Registry

__all__ = [
    "ARCHITECTURES", "AttributeNet", "AttributeNetConfig", "AttributeTrainConfig", "load_attribute_net",
    "read_attribute_net_files", "train_attribute_net", "write_attribute_net_files",
]

KIND = "attribute-net"
WEIGHTS = "weights.safetensors"


# name -> factory(pretrained) -> (backbone: images -> features, feature width)
ARCHITECTURES: Registry[Callable[[bool], tuple[nn.Module, int]]] = Registry("attribute-network architecture")


@ARCHITECTURES.register("judge_cnn")
def _judge_cnn(pretrained: bool = True) -> tuple[nn.Module, int]:
    """Four VGG-style blocks (3x3 conv + BN + ReLU, then 2x2 max-pool), global average pool.

    One conv per block keeps it trainable on a CPU in minutes. Always from scratch."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (32, 64, 128, 256):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), channels


@ARCHITECTURES.register("mobilenet_v2")
def _mobilenet_v2(pretrained: bool = True) -> tuple[nn.Module, int]:
    """mobilenet_v2 (features + global pool), ImageNet weights when `pretrained`: the in-domain embedder's start."""
    return mobilenet_v2_features(pretrained).train(), MOBILENET_V2_WIDTH


@dataclass
class AttributeNetConfig:
    architecture: str = "judge_cnn"
    input_size: int = 64
    feature_dim: int = 256  # the penultimate layer: the embedding, and what the heads read


class AttributeNet(nn.Module):
    """uint8 images -> penultimate features -> one logit vector per attribute group."""

    def __init__(self, schema: AttributeSchema, config: AttributeNetConfig, pretrained: bool = True):
        super().__init__()
        self.schema, self.config = schema, config
        # pretrained=False: the saved weights are loaded next, so the ImageNet file is not read
        self.backbone, width = ARCHITECTURES.get(config.architecture)(pretrained)
        self.bottleneck = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, config.feature_dim))
        # a list in schema order: group names such as "type" clash with nn.Module attributes
        self.heads = nn.ModuleList(nn.Linear(config.feature_dim, len(g.values)) for g in schema.groups)

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 1|3) -> normalised float (N, 3, S, S): the embedders' own input path."""
        return network_input(images, self.config.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {g.name: head(f) for g, head in zip(self.schema.groups, self.heads)}

    @torch.inference_mode()
    def run(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(features (N, d), {group: probabilities (N, values)}) for uint8 images, in eval mode."""
        self.eval()
        feats, probs = [], {g.name: [] for g in self.schema.groups}
        for i in range(0, len(images), batch_size):
            f = self.features(self.prepare(images[i : i + batch_size]))
            feats.append(f.numpy())
            for g, head in zip(self.schema.groups, self.heads):
                logits = head(f)
                probs[g.name].append((torch.sigmoid(logits) if g.multi_label else F.softmax(logits, dim=1)).numpy())
        return np.concatenate(feats), {g: np.concatenate(p) for g, p in probs.items()}

    def predict(self, images: np.ndarray) -> list[dict[str, Any]]:
        """The most likely value of each single-label group (and the values above 0.5 of multi-label ones)."""
        return self.answers(self.run(images)[1])

    def answers(self, probs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """`predict` from probabilities `run` already gave."""
        out = []
        for i in range(len(next(iter(probs.values())))):
            row: dict[str, Any] = {}
            for g in self.schema.groups:
                p = probs[g.name][i]
                row[g.name] = tuple(v for v, q in zip(g.values, p) if q > 0.5) if g.multi_label else g.values[int(p.argmax())]
            out.append(row)
        return out


def targets(schema: AttributeSchema, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per group: class indices (-1 where missing) or a multi-hot matrix."""
    out = {}
    for g in schema.groups:
        if g.multi_label:
            hot = np.zeros((len(rows), len(g.values)), dtype=np.float32)
            for i, r in enumerate(rows):
                for v in r.get(g.name) or ():
                    hot[i, g.index_of(v)] = 1.0
            out[g.name] = torch.from_numpy(hot)
        else:
            out[g.name] = torch.tensor([g.index_of(r[g.name]) if r.get(g.name) in g.values else -1 for r in rows])
    return out


def loss_of(net: AttributeNet, logits: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = []
    for g in net.schema.groups:
        if g.multi_label:
            losses.append(F.binary_cross_entropy_with_logits(logits[g.name], target[g.name]))
        elif (target[g.name] >= 0).any():
            losses.append(F.cross_entropy(logits[g.name], target[g.name], ignore_index=-1))
    return torch.stack(losses).sum()


def accuracy(net: AttributeNet, images: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Held-out accuracy per single-label group (rows with the value missing left out) and
    exact-set accuracy per multi-label group."""
    predicted = net.predict(images)
    result = {}
    for g in net.schema.groups:
        if g.multi_label:
            result[g.name] = float(np.mean([set(p[g.name]) == set(r.get(g.name) or ()) for p, r in zip(predicted, rows)]))
        else:
            pairs = [(p[g.name], r[g.name]) for p, r in zip(predicted, rows) if r.get(g.name) in g.values]
            result[g.name] = float(np.mean([a == b for a, b in pairs])) if pairs else float("nan")
    return result


@dataclass
class AttributeTrainConfig:
    catalogue: Path
    out: Path
    architecture: str = "judge_cnn"
    input_size: int = 64
    feature_dim: int = 256
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    max_seconds: float | None = None
    limit: int | None = None  # first N rows of each split (tests)
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    command: str | None = None


def train_attribute_net(cfg: AttributeTrainConfig) -> Path:
    """Train on the catalogue's train split, measure on its test split, publish at `cfg.out`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    catalogue = Catalogue.open(cfg.catalogue)
    splits = set(catalogue.attributes().column("split").to_pylist())
    if not {"train", "test"} <= splits:
        raise ValueError(f"catalogue {catalogue.name!r} needs 'train' and 'test' splits to train and measure "
                         f"an attribute network; it has {sorted(s for s in splits if s)}")
    schema = catalogue.schema
    net = AttributeNet(schema, AttributeNetConfig(cfg.architecture, cfg.input_size, cfg.feature_dim))
    train_images, train_rows = catalogue.load_images(split="train", limit=cfg.limit)
    test_images, test_rows = catalogue.load_images(split="test", limit=cfg.limit)
    train_attrs = train_rows.select(list(schema.names)).to_pylist()
    test_attrs = test_rows.select(list(schema.names)).to_pylist()
    x = net.prepare(train_images)  # prepared once: the epochs reuse it
    y = targets(schema, train_attrs)
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, cfg.learning_rate, total_steps=max(steps, 1))
    generator = torch.Generator().manual_seed(cfg.seed)
    start, seen, epoch, last = time.perf_counter(), 0, 0, float("nan")
    net.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        bar = progress_bar(total=len(x), unit="img", desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress,
                           leave=False)
        for i in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            batch = x[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # garments are left-right symmetric
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
            loss = loss_of(net, net(batch), {k: v[idx] for k, v in y.items()})
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            seen += len(idx)
            last = loss.item()
            bar.update(len(idx))
            if cfg.max_seconds and time.perf_counter() - start >= cfg.max_seconds:
                break
        bar.close()
        print(f"epoch {epoch}: loss {last:.3f}, {seen / (time.perf_counter() - start):.0f} img/s", file=sys.stderr)
        if cfg.max_seconds and time.perf_counter() - start >= cfg.max_seconds:
            break
    seconds = time.perf_counter() - start
    net.eval()
    held_out = accuracy(net, test_images, test_attrs)
    training = {
        "catalogue": catalogue.name, "catalogue_fingerprint": catalogue.fingerprint, "train_rows": len(x),
        "test_rows": len(test_images), "epochs": epoch, "images_seen": seen, "seconds": round(seconds, 1),
        "images_per_second": round(seen / max(seconds, 1e-9), 1), "final_loss": round(last, 4),
        "test_accuracy": held_out, "seed": cfg.seed, "command": cfg.command or " ".join(sys.argv),
        "torch_threads": torch.get_num_threads(),
    }
    return save_attribute_net(net, cfg.out, training)


def save_attribute_net(net: AttributeNet, dest: Path, training: dict[str, Any]) -> Path:
    with artifacts.staging(dest) as stage:
        write_attribute_net_files(net, stage)
        artifacts.write_manifest(stage, KIND, architecture=net.config.architecture, training=training)
        return artifacts.publish(stage, dest)


def write_attribute_net_files(net: AttributeNet, folder: Path) -> None:
    """config.json + weights.safetensors into `folder` (a checkpoint, or an index's embedder/)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"config": asdict(net.config), "schema": net.schema.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / WEIGHTS)


def read_attribute_net_files(folder: Path) -> AttributeNet:
    config = json.loads((folder / "config.json").read_text())
    net = AttributeNet(AttributeSchema.from_dict(config["schema"]), AttributeNetConfig(**config["config"]),
                       pretrained=False)
    net.load_state_dict(load_file(folder / WEIGHTS))
    return net.eval()


def load_attribute_net(path: Path, verify: bool = True) -> tuple[AttributeNet, dict[str, Any]]:
    """(network in eval mode, manifest) from a folder written by `train_attribute_net`."""
    folder = artifacts.resolve(path)
    manifest = artifacts.read_manifest(folder, KIND, verify=verify)
    manifest["version"] = folder.name
    return read_attribute_net_files(folder), manifest
