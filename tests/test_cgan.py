"""The CGAN: trains, saves without pickle, reloads to identical samples, resumes."""

import json

import numpy as np
import pytest
import torch

from atelier import artifacts
from atelier.catalog.fashion_mnist import SCHEMA
from atelier.generator import load_generator
from atelier.generator.cgan import CGAN, CGANConfig, CGANTrainer, Discriminator
from atelier.generator.train import TrainConfig, train

TINY = {"g_width": 8, "d_width": 8, "embed_dim": 8, "latent_dim": 16}


@pytest.mark.parametrize("size", [28, 32, 64])
def test_shapes_for_each_supported_size(size):
    config = CGANConfig(image_size=size, channels=3, **TINY)
    g, d = CGAN(SCHEMA, config), Discriminator(SCHEMA, config)
    cond = torch.from_numpy(np.stack([SCHEMA.encode({"category": "Dress"})] * 2))
    images = g(torch.randn(2, 16), cond)
    assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
    assert d(images, cond).shape == (2,)


def test_training_steps_give_finite_losses_that_move():
    torch.manual_seed(0)
    g = CGAN(SCHEMA, CGANConfig(**TINY))
    trainer = CGANTrainer(g)
    real = torch.rand(16, 1, 28, 28) * 2 - 1
    cond = torch.eye(10)[torch.arange(16) % 10]
    losses = [trainer.step(real, cond) for _ in range(6)]
    assert all(np.isfinite(v) for step in losses for v in step.values())
    assert losses[0]["loss_d"] != losses[-1]["loss_d"] and losses[0]["loss_g"] != losses[-1]["loss_g"]


def test_condition_changes_the_sample():
    g = CGAN(SCHEMA, CGANConfig(**TINY))
    with torch.no_grad():  # DCGAN's N(0, 0.02) init draws near-constant images: spread the weights
        for p in g.parameters():
            p.normal_(0, 0.5)
    a = g.sample({"category": "Dress"}, 2, seed=5)
    b = g.sample({"category": "Sandal"}, 2, seed=5)
    assert a.dtype == np.uint8 and a.shape == (2, 28, 28, 1)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, g.sample({"category": "Dress"}, 2, seed=5))


def test_checkpoint_reloads_to_identical_samples_and_holds_no_pickle(tiny_model):
    folder = artifacts.resolve(tiny_model)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "discriminator.safetensors", "manifest.json", "optimizer_d.safetensors", "optimizer_g.safetensors",
        "samples.png", "weights.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["family"] == "cgan" and config["schema"] == SCHEMA.to_dict()
    model, manifest = load_generator(tiny_model)
    again, _ = load_generator(tiny_model)
    first = model.sample({"category": "Bag"}, 4, seed=11)
    assert np.array_equal(first, again.sample({"category": "Bag"}, 4, seed=11))
    assert manifest["training"]["images_seen"] == 4 * 32
    assert manifest["training"]["catalogue_fingerprint"]


def test_resume_continues_the_count_and_keeps_the_schema(tmp_path, small_catalogue):
    out = tmp_path / "model"
    common = dict(catalogue=small_catalogue, out=out, batch_size=32, max_steps=2, progress=False, model_overrides=TINY)
    train(TrainConfig(**common))
    train(TrainConfig(**common, resume=True))
    _, manifest = load_generator(out)
    assert manifest["training"]["images_seen"] == 2 * 2 * 32
    grids = sorted(p.name for p in (tmp_path / "model.samples").iterdir())
    assert grids and all(name.endswith(".png") for name in grids)


def test_unknown_model_option_is_refused(tmp_path, small_catalogue):
    with pytest.raises(ValueError, match="unknown cgan option"):
        train(TrainConfig(catalogue=small_catalogue, out=tmp_path / "m", max_steps=1, progress=False,
                          model_overrides={"g_widht": 8}))
    assert not (tmp_path / "m").exists()


# -- the multi-conditional GAN ------------------------------------------------------------

from atelier.catalog.schema import AttributeGroup, AttributeSchema  # noqa: E402
from atelier.generator.conditioning import ConditionEmbedding, drop_groups  # noqa: E402
from atelier.generator.mcgan import MCGAN, MCGANConfig, ProjectionDiscriminator  # noqa: E402

TWO_GROUPS = AttributeSchema((AttributeGroup("type", ("Topwear", "Bottomwear", "Shoes")),
                              AttributeGroup("colour", ("Black", "White"))))
TINY_MC = dict(image_size=32, g_width=8, d_width=8, embed_dim=8, latent_dim=16)


def test_any_embedding_replaces_an_unspecified_group_only():
    embed = ConditionEmbedding(TWO_GROUPS, 4, learn_any=True)
    full = torch.from_numpy(TWO_GROUPS.encode({"type": "Shoes", "colour": "Black"}))[None]
    partial = torch.from_numpy(TWO_GROUPS.encode({"type": "Shoes"}, require_all=False))[None]
    a, b = embed(full), embed(partial)
    assert torch.equal(a[:, :4], b[:, :4])  # the given group is embedded the same way
    assert torch.allclose(b[:, 4:], embed.any[1][None])  # the missing one is the learned "any"


def test_drop_groups_zeroes_whole_blocks():
    torch.manual_seed(0)
    cond = torch.from_numpy(np.stack([TWO_GROUPS.encode({"type": "Topwear", "colour": "White"})] * 400))
    dropped = drop_groups(cond, [3, 2], 0.25)
    per_group = torch.stack([dropped[:, :3].sum(1), dropped[:, 3:].sum(1)], 1)
    assert set(per_group.unique().tolist()) <= {0.0, 1.0}  # a block is kept whole or dropped whole
    assert 0.15 < (per_group == 0).float().mean().item() < 0.35


@pytest.mark.parametrize("discriminator", ["projection", "channel"])
def test_mcgan_trains_and_accepts_a_partial_request(discriminator):
    torch.manual_seed(0)
    g = MCGAN(TWO_GROUPS, MCGANConfig(discriminator=discriminator, **TINY_MC))
    trainer = g.Trainer(g)
    assert isinstance(trainer.d, ProjectionDiscriminator) == (discriminator == "projection")
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    cond = torch.from_numpy(np.stack([TWO_GROUPS.encode(c) for c in TWO_GROUPS.combinations()] * 2)[:8])
    losses = [trainer.step(real, cond) for _ in range(4)]
    assert all(np.isfinite(v) for step in losses for v in step.values())
    assert losses[0]["loss_g"] != losses[-1]["loss_g"]
    images = g.sample({"colour": "Black"}, 3, seed=1)  # type left out: drawn from "any"
    assert images.shape == (3, 32, 32, 3)
    with pytest.raises(Exception, match="unknown value"):
        g.sample({"colour": "Purple"}, 1)


def test_cgan_still_requires_every_single_label_group():
    g = CGAN(TWO_GROUPS, CGANConfig(**TINY_MC))
    with pytest.raises(Exception, match="missing attribute"):
        g.sample({"colour": "Black"}, 1)


def test_mode_seeking_pairs_fakes_and_reports_their_distance():
    torch.manual_seed(0)
    g = CGAN(SCHEMA, CGANConfig(mode_seeking=1.0, **TINY))
    trainer = CGANTrainer(g)
    real = torch.rand(16, 1, 28, 28) * 2 - 1
    cond = torch.eye(10)[torch.arange(16) % 10]
    losses = [trainer.step(real, cond) for _ in range(3)]
    assert all(step["ms_ratio"] > 0 and np.isfinite(step["loss_g"]) for step in losses)


def test_attribute_grid_has_a_cell_per_value_pair():
    from atelier.generator.train import attribute_grid

    g = MCGAN(TWO_GROUPS, MCGANConfig(**TINY_MC))
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.5)
    grid, rows, columns = attribute_grid(g, "colour", "type", seed=3)
    assert rows == ["Black", "White"] and columns == ["Topwear", "Bottomwear", "Shoes"]
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 32 px cells, 2 px padding
    cell = lambda r, c: grid[2 + r * 34 : 34 + r * 34, 2 + c * 34 : 34 + c * 34]  # noqa: E731
    assert not np.array_equal(cell(0, 0), cell(1, 0)) and not np.array_equal(cell(0, 0), cell(0, 1))
