"""The conditional VAE: shapes, the loss pieces by hand, training, checkpoints, resume, serving."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atelier import artifacts
from atelier.catalog.fashion_mnist import SCHEMA
from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.generator import FAMILIES, load_generator
from atelier.generator.cvae import CVAE, CVAEConfig, CVAETrainer, kl_divergence, kl_weight_at, reconstruction_loss
from atelier.generator.train import TrainConfig, train

TINY = {"width": 8, "embed_dim": 8, "latent_dim": 16}
TWO_GROUPS = AttributeSchema((AttributeGroup("type", ("Topwear", "Bottomwear", "Shoes")),
                              AttributeGroup("colour", ("Black", "White"))))


def conditions(*categories):
    return torch.from_numpy(np.stack([SCHEMA.encode({"category": c}) for c in categories]))


def test_registered_under_cvae():
    assert FAMILIES.get("cvae") is CVAE and CVAE.Trainer is CVAETrainer


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_shapes_for_each_supported_size(size, recon):
    torch.manual_seed(0)
    model = CVAE(SCHEMA, CVAEConfig(image_size=size, channels=3, recon=recon, **TINY))
    cond = conditions("Dress", "Bag", "Sneaker")
    images = model(torch.randn(3, 16) * 5, cond)  # a wide z: the sigmoid still bounds the images
    assert images.shape == (3, 3, size, size) and images.abs().max() <= 1
    mu, logvar = model.encode(images, cond)
    assert mu.shape == logvar.shape == (3, 16)
    assert model.reconstruct(images, cond).shape == images.shape
    assert model.sample({"category": "Dress"}, 2, seed=1).shape == (2, size, size, 3)


def test_condition_changes_the_sample_and_the_seed_fixes_it():
    torch.manual_seed(0)
    model = CVAE(SCHEMA, CVAEConfig(**TINY))
    a = model.sample({"category": "Dress"}, 2, seed=5)
    assert a.dtype == np.uint8 and a.shape == (2, 28, 28, 1)
    assert not np.array_equal(a, model.sample({"category": "Sandal"}, 2, seed=5))
    assert not np.array_equal(a, model.sample({"category": "Dress"}, 2, seed=6))
    assert np.array_equal(a, model.sample({"category": "Dress"}, 2, seed=5))


def test_the_encoder_sees_the_condition():
    torch.manual_seed(0)
    model = CVAE(SCHEMA, CVAEConfig(**TINY))
    image = torch.rand(1, 1, 28, 28) * 2 - 1
    mu_dress, _ = model.encode(image, conditions("Dress"))
    mu_bag, _ = model.encode(image, conditions("Bag"))
    assert not torch.allclose(mu_dress, mu_bag)


# -- the loss pieces, by hand -------------------------------------------------------------

def test_kl_divergence_by_hand():
    # Per dimension -0.5 * (1 + logvar - mu^2 - exp(logvar)):
    #   mu 1, logvar 0:      -0.5 * (1 + 0 - 1 - 1)         = 0.5
    #   mu 0, logvar log 2:  -0.5 * (1 + log 2 - 0 - 2)     = 0.5 - 0.5 log 2
    # row 1 sums to 1 - 0.5 log 2 (0.65343); row 2 is N(0, I) itself, KL 0; the batch mean halves it.
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    assert kl_divergence(mu[:1], logvar[:1]).item() == pytest.approx(1 - 0.5 * math.log(2), abs=1e-6)
    assert kl_divergence(mu, logvar).item() == pytest.approx((1 - 0.5 * math.log(2)) / 2, abs=1e-6)
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0


def test_reconstruction_by_hand():
    # One 1 x 2 image, logits [0, log 3], target [-1, 1] (pixels 0 and 1 in [0, 1]).
    #   bce: pixel 1 p = sigmoid(0) = 1/2, target 0: -log(1/2) = log 2
    #        pixel 2 p = sigmoid(log 3) = 3/4, target 1: -log(3/4) = log(4/3)   sum: log(8/3)
    #   mse: images 2p - 1 = [0, 1/2]: (0 - -1)^2 + (1/2 - 1)^2 = 1.25
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])
    target = torch.tensor([[[[-1.0, 1.0]]]])
    assert reconstruction_loss("bce", logits, target).item() == pytest.approx(math.log(8 / 3), abs=1e-6)
    assert reconstruction_loss("mse", logits, target).item() == pytest.approx(1.25, abs=1e-6)
    # A second image that is reconstructed exactly under mse (logit 0 -> 0) halves the batch mean.
    both_logits = torch.cat([logits, torch.zeros_like(logits)])
    both_target = torch.cat([target, torch.zeros_like(target)])
    assert reconstruction_loss("mse", both_logits, both_target).item() == pytest.approx(0.625, abs=1e-6)
    with pytest.raises(ValueError, match="allowed: bce, mse"):
        reconstruction_loss("l1", logits, target)


def test_kl_weight_annealing():
    assert kl_weight_at(0, 2.0, 10) == 0.0
    assert kl_weight_at(5, 2.0, 10) == pytest.approx(1.0)
    assert kl_weight_at(10, 2.0, 10) == pytest.approx(2.0)
    assert kl_weight_at(25, 2.0, 10) == pytest.approx(2.0)  # stays at the full weight
    assert kl_weight_at(0, 2.0, 0) == 2.0  # no annealing: full weight from the first step


@pytest.mark.parametrize("bad, fragment", [
    ({"recon": "l1"}, "unknown recon 'l1'; allowed: bce, mse"),
    ({"kl_weight": -1.0}, "must be >= 0"),
    ({"condition_dropout": 1.0}, "must be in [0, 1)"),
])
def test_config_errors_name_what_is_allowed(bad, fragment):
    with pytest.raises(ValueError) as error:
        CVAE(SCHEMA, CVAEConfig(**TINY, **bad))
    assert fragment in str(error.value)


# -- training -----------------------------------------------------------------------------

@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_training_steps_give_finite_losses_that_fall(recon):
    torch.manual_seed(0)
    model = CVAE(SCHEMA, CVAEConfig(recon=recon, **TINY))
    trainer = CVAETrainer(model)
    real = (torch.rand(16, 1, 28, 28) > 0.7).float() * 2 - 1  # a fixed batch to fit
    cond = torch.eye(10)[torch.arange(16) % 10]
    encoder_before = model.to_posterior.weight.detach().clone()
    losses = [trainer.step(real, cond) for _ in range(8)]
    assert all(set(step) == {"loss", "recon", "kl", "kl_weight"} for step in losses)
    assert all(np.isfinite(v) for step in losses for v in step.values())
    assert losses[-1]["recon"] < losses[0]["recon"] and losses[-1]["loss"] < losses[0]["loss"]
    assert all(step["kl"] >= 0 for step in losses)
    assert not torch.equal(encoder_before, model.to_posterior.weight)  # the encoder trains too
    assert int(model.trained_steps) == 8
    assert list(trainer.extra_state()) == ["optimizer"]  # the encoder and step count live in the weights


def test_trainer_anneals_the_kl_weight_step_by_step():
    torch.manual_seed(0)
    model = CVAE(SCHEMA, CVAEConfig(kl_weight=0.5, kl_anneal_steps=4, **TINY))
    trainer = CVAETrainer(model)
    real, cond = torch.rand(4, 1, 28, 28) * 2 - 1, torch.eye(10)[:4]
    weights = [trainer.step(real, cond)["kl_weight"] for _ in range(6)]
    assert weights == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    first = CVAETrainer(CVAE(SCHEMA, CVAEConfig(kl_weight=0.5, **TINY))).step(real, cond)
    assert first["kl_weight"] == 0.5 and first["loss"] == pytest.approx(first["recon"] + 0.5 * first["kl"], rel=1e-5)


def test_condition_dropout_learns_any_and_accepts_partial_requests():
    config = dict(image_size=32, channels=3, **TINY)
    plain, partial = CVAE(TWO_GROUPS, CVAEConfig(**config)), CVAE(TWO_GROUPS, CVAEConfig(condition_dropout=0.3, **config))
    assert not plain.accepts_partial and partial.accepts_partial  # per instance, from the config
    assert plain.embed.any is None and partial.embed.any is not None
    with pytest.raises(Exception, match="missing attribute"):
        plain.sample({"colour": "Black"}, 1)
    torch.manual_seed(0)
    trainer = CVAETrainer(partial)
    cond = torch.from_numpy(np.stack([TWO_GROUPS.encode(c) for c in TWO_GROUPS.combinations()] * 2)[:8])
    any_before = partial.embed.any.detach().clone()
    losses = [trainer.step(torch.rand(8, 3, 32, 32) * 2 - 1, cond) for _ in range(3)]
    assert all(np.isfinite(v) for step in losses for v in step.values())
    assert not torch.equal(any_before, partial.embed.any)  # dropped groups trained the "any" vectors
    assert partial.sample({"colour": "Black"}, 3, seed=1).shape == (3, 32, 32, 3)


# -- checkpoints, resume, serving ------------------------------------------------------------

@pytest.fixture(scope="module")
def cvae_model(tmp_path_factory, small_catalogue):
    out = tmp_path_factory.mktemp("cvae") / "cvae-tiny"
    train(TrainConfig(catalogue=small_catalogue, out=out, model="cvae", epochs=1, batch_size=32, max_steps=2,
                      progress=False, model_overrides={**TINY, "kl_anneal_steps": 8}))
    return out


def test_checkpoint_reloads_to_identical_samples_and_encodings(cvae_model):
    folder = artifacts.resolve(cvae_model)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "manifest.json", "optimizer.safetensors", "samples.png", "weights.safetensors"]
    weights = load_file(folder / "weights.safetensors")
    assert "to_posterior.weight" in weights and int(weights["trained_steps"]) == 2  # encoder and step count saved
    model, manifest = load_generator(cvae_model)
    again, _ = load_generator(cvae_model)
    assert model.family == "cvae" and model.config.kl_anneal_steps == 8 and model.config.width == 8
    first = model.sample({"category": "Bag"}, 4, seed=11)
    assert np.array_equal(first, again.sample({"category": "Bag"}, 4, seed=11))
    assert not np.array_equal(first, model.sample({"category": "Bag"}, 4, seed=12))
    image, cond = torch.rand(2, 1, 28, 28) * 2 - 1, conditions("Bag", "Coat")
    with torch.no_grad():
        assert torch.equal(model.encode(image, cond)[0], again.encode(image, cond)[0])
    assert manifest["training"]["images_seen"] == 2 * 32
    assert set(manifest["training"]["losses"]) == {"loss", "recon", "kl", "kl_weight"}


def test_resume_continues_the_kl_annealing(tmp_path, small_catalogue):
    out = tmp_path / "cvae"
    common = {"catalogue": small_catalogue, "out": out, "model": "cvae", "batch_size": 32, "max_steps": 2,
              "progress": False, "model_overrides": {**TINY, "kl_weight": 2.0, "kl_anneal_steps": 8}}
    train(TrainConfig(**common))
    _, manifest = load_generator(out)
    assert manifest["training"]["losses"]["kl_weight"] == pytest.approx(2.0 * 1 / 8)  # steps 0, 1
    train(TrainConfig(**common, resume=True))
    model, manifest = load_generator(out)
    assert int(model.trained_steps) == 4
    assert manifest["training"]["losses"]["kl_weight"] == pytest.approx(2.0 * 3 / 8)  # steps 2, 3: not restarted
    assert manifest["training"]["images_seen"] == 2 * 2 * 32


def test_serves_through_the_grpc_server(small_index, cvae_model):
    from atelier.retrieval.service import RetrievalService
    from atelier.server.app import start_server
    from atelier.server.client import AtelierClient

    server = start_server(RetrievalService.open(small_index, {"cvae": cvae_model}))
    try:
        with AtelierClient(server.target) as client:
            client.wait_ready()
            schema = client.get_schema()
            assert [(m.name, m.family) for m in schema.models] == [("cvae", "cvae")]
            response = client.generate_and_retrieve({"category": "Dress"}, num_samples=2, top_k=5, seed=3)
            assert len(response.products) == 5 and len({p.id for p in response.products}) == 5
            assert response.model == "cvae" and response.model_version.startswith("cvae:")
    finally:
        server.stop(grace=1)
