"""Model checkpoints: `config.json` + `weights.safetensors` (+ `manifest.json`), never pickle.

`config.json` names the family, its architecture config and the AttributeSchema, so a
checkpoint rebuilds its model from data alone. Training-only state (a GAN's discriminator, the
optimizers' moments as `OptimizerState`) is saved beside it as `<name>.safetensors`, so that a
resumed run goes on exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atelier import artifacts
from atelier.catalog.schema import AttributeSchema
from atelier.generator.base import ConditionalGenerator, family

KIND = "model"
WEIGHTS = "weights.safetensors"


def save_checkpoint(
    model: ConditionalGenerator,
    dest: Path,
    training: dict[str, Any] | None = None,
    extra: dict[str, nn.Module] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write the checkpoint to a staging folder and publish it atomically at `dest`."""
    with artifacts.staging(dest) as stage:
        config = {"family": model.family, "config": model.config_dict(), "schema": model.schema.to_dict()}
        (stage / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_contiguous(model.state_dict()), stage / WEIGHTS)
        for name, module in (extra or {}).items():
            save_file(_contiguous(module.state_dict()), stage / f"{name}.safetensors")
        for name, data in (files or {}).items():
            (stage / name).write_bytes(data)
        artifacts.write_manifest(stage, KIND, family=model.family, training=training or {})
        return artifacts.publish(stage, dest)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((artifacts.resolve(path) / "config.json").read_text())


def build_from_config(config: dict[str, Any]) -> ConditionalGenerator:
    cls = family(config["family"])
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(config["config"]) - fields
    if unknown:
        raise artifacts.ArtifactError(f"checkpoint config has fields {sorted(unknown)} unknown to {cls.family}")
    return cls(AttributeSchema.from_dict(config["schema"]), cls.Config(**config["config"]))


def load_generator(path: Path, verify: bool = True, sampling: Mapping[str, Any] | None = None
                   ) -> tuple[ConditionalGenerator, dict[str, Any]]:
    """Rebuild a generator from a checkpoint folder; returns (model in eval mode, manifest).
    `sampling`: the family's sampling options to set on this copy (e.g. {"sample_steps": 4})."""
    folder = artifacts.resolve(path)
    manifest = artifacts.read_manifest(folder, KIND, verify=verify)
    model = build_from_config(json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(folder / WEIGHTS))
    model.eval()
    if sampling:
        model.with_sampling(sampling)
        manifest["sampling"] = dict(sampling)  # what this loaded copy does differently from the checkpoint
    manifest["version"] = folder.name
    manifest["weights_sha256"] = manifest["files"][WEIGHTS]
    return model, manifest


def load_extra(path: Path, name: str, module: nn.Module) -> bool:
    """Load a training-only module (e.g. the discriminator) if the checkpoint has it."""
    file = artifacts.resolve(path) / f"{name}.safetensors"
    if not file.is_file():
        return False
    module.load_state_dict(load_file(file))
    return True


class OptimizerState(nn.Module):
    """An optimizer's per-parameter state as a flat tensor dict, so it saves as safetensors."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.optimizer = optimizer

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = {}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{index}.{key}"] = torch.as_tensor(value)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in state.items():
            index, key = name.split(".", 1)
            per_param.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict({"state": per_param, "param_groups": self.optimizer.state_dict()["param_groups"]})
