"""The conditional progressive GAN and its disentangled variant: schedule, fade-in, losses, serving."""

import math

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atelier.catalog.fashion_mnist import SCHEMA
from atelier.generator import load_generator
from atelier.generator.conditioning import ConditioningAugmentation, kl_to_standard_normal, mismatched, reparameterise
from atelier.generator.cpggan import (
    CDPGGAN,
    CPGGAN,
    CDPGGANConfig,
    CPGGANConfig,
    CPGGANTrainer,
    batch_size_for,
    consistency_distance,
    drift_penalty,
    fade,
    gradient_penalty,
    lse_discriminator_loss,
    lse_generator_loss,
    phase_at,
    real_at,
    share_field,
    wgan_generator_loss,
    wgan_mismatch_discriminator_loss,
)
from atelier.generator.train import TrainConfig, train
from atelier.retrieval.service import RetrievalService
from atelier.server.app import start_server
from atelier.server.client import AtelierClient

# Fashion-MNIST is 28 px = 7 * 2**2: grow 7 -> 14 -> 28
TINY = {"start_size": 7, "image_size": 28, "channels": 1, "g_width": 4, "d_width": 4, "max_width": 16,
        "embed_dim": 4, "ca_dim": 4, "latent_dim": 8, "phase_images": 32, "batch_sizes": "7:16,14:16,28:8"}


def conditions(*categories):
    return torch.from_numpy(np.stack([SCHEMA.encode({"category": c}) for c in categories]))


def test_schedule_grows_with_a_fade_in_then_a_stable_phase_per_resolution():
    cfg = CPGGANConfig(phase_images=100)  # 4, 8, 16, 32, 64
    assert phase_at(0, cfg) == (0, 1.0) and phase_at(99, cfg) == (0, 1.0)
    assert phase_at(100, cfg) == (1, 0.0) and phase_at(150, cfg) == (1, 0.5)
    assert phase_at(200, cfg) == (1, 1.0) and phase_at(325, cfg) == (2, 0.25)
    assert phase_at(10**9, cfg) == (4, 1.0)
    assert batch_size_for(4, cfg.batch_sizes) == 64 and batch_size_for(64, cfg.batch_sizes) == 32
    assert batch_size_for(48, "4:64,32:16") == 16
    with pytest.raises(ValueError, match="start_size 4 times a power of 2"):
        CPGGAN(SCHEMA, CPGGANConfig(image_size=48))


def test_generator_fade_in_blends_the_upsampled_old_output_with_the_new_block():
    torch.manual_seed(0)
    g = CPGGAN(SCHEMA, CPGGANConfig(**TINY)).eval()
    z, c = torch.randn(3, g.latent_dim), conditions("Dress", "Bag", "Sandal")
    with torch.no_grad():
        old, _, _ = g.generate(z, c, level=0)
        at_zero, _, _ = g.generate(z, c, level=1, alpha=0.0)
        new, _, _ = g.generate(z, c, level=1, alpha=1.0)
        quarter, _, _ = g.generate(z, c, level=1, alpha=0.25)
    assert old.shape[-1] == 7 and new.shape[-1] == 14
    assert torch.allclose(at_zero, F.interpolate(old, scale_factor=2, mode="nearest"), atol=1e-6)
    # the blend happens before tanh: atanh(out) = 0.75 * atanh(old) + 0.25 * atanh(new)
    expected = torch.tanh(0.75 * torch.atanh(at_zero.clamp(-0.999999, 0.999999))
                          + 0.25 * torch.atanh(new.clamp(-0.999999, 0.999999)))
    assert torch.allclose(quarter, expected, atol=1e-4)
    assert not torch.allclose(quarter, new, atol=1e-4)
    assert torch.equal(fade(torch.zeros(2), torch.ones(2), 0.3), torch.full((2,), 0.3))


def test_discriminator_fade_in_at_alpha_zero_sees_the_downsampled_image():
    torch.manual_seed(0)
    g = CPGGAN(SCHEMA, CPGGANConfig(**TINY))
    d = g.make_discriminator().eval()
    x, c = torch.rand(4, 1, 14, 14) * 2 - 1, conditions("Dress", "Bag", "Sandal", "Bag")
    with torch.no_grad():
        assert torch.allclose(d(x, c, level=1, alpha=0.0), d(F.avg_pool2d(x, 2), c, level=0), atol=1e-5)
        assert not torch.allclose(d(x, c, level=1, alpha=1.0), d(F.avg_pool2d(x, 2), c, level=0), atol=1e-5)
    # real images fade the same way: at alpha 0 they are the coarse images, at 1 the sharp ones
    sharp = real_at(torch.rand(2, 1, 28, 28), 14, 1.0)
    assert torch.allclose(real_at(sharp, 14, 0.0), F.interpolate(F.avg_pool2d(sharp, 2), scale_factor=2))


def test_losses_are_the_formulas_of_the_seed():
    real_right, fake, real_wrong = torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0])
    # ((0.5-1)^2 + 0)/2 + (0 + 1)/2 + (0+1)^2 = 0.125 + 0.5 + 1
    assert lse_discriminator_loss(real_right, fake, real_wrong).item() == pytest.approx(1.625)
    assert lse_generator_loss(torch.tensor([1.0, 2.0])).item() == pytest.approx(2.5)
    # -(2 - 0.5) - (2 - 1) + 0.7
    loss = wgan_mismatch_discriminator_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0]),
                                            torch.tensor(0.7))
    assert loss.item() == pytest.approx(-1.8)
    assert wgan_generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)
    # (1 + 9)/2 + 4
    assert drift_penalty(torch.tensor([1.0, 3.0]), torch.tensor([2.0])).item() == pytest.approx(9.0)


def test_gradient_penalty_of_a_linear_critic():
    class Linear(torch.nn.Module):  # D(x) = <w, x> with |w| = 2: gradient norm 2 everywhere, penalty (2-1)^2
        def forward(self, x, condition, level, alpha):
            return 2 * x.flatten(1)[:, 0]

    real, fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    assert gradient_penalty(Linear(), real, fake, None, 0, 1.0).item() == pytest.approx(1.0)


def test_conditioning_augmentation_kl_and_sampling():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # per dimension 0.5 * (1 + 1 - 1 - 0) and 0.5 * (0 + 2 - 1 - log 2); their mean
    assert kl_to_standard_normal(mu, logvar).item() == pytest.approx((1 - 0.5 * math.log(2)) / 2)
    assert kl_to_standard_normal(torch.zeros(5, 3), torch.zeros(5, 3)).item() == 0
    ca = ConditioningAugmentation(3, 2)
    embedded, eps = torch.randn(4, 3), torch.randn(4, 2)
    m, lv = ca(embedded)
    assert m.shape == lv.shape == (4, 2)
    assert torch.allclose(reparameterise(m, lv, eps), m + torch.exp(0.5 * lv) * eps)


def test_mismatched_pairs_and_shared_fields():
    c = conditions("Dress", "Dress", "Bag")
    wrong, differs = mismatched(c)
    assert torch.equal(wrong, c.roll(1, dims=0)) and differs.tolist() == [True, False, True]
    two_groups = torch.tensor([[1, 0, 0, 1.0], [0, 1, 1, 0.0]])  # groups of sizes 2, 2
    partner = share_field(two_groups, [2, 2], group=0)
    assert torch.equal(partner[:, :2], two_groups[:, :2]) and torch.equal(partner[:, 2:], two_groups.roll(1, 0)[:, 2:])


def test_lowpass_consistency_ignores_texture_but_not_shape():
    flat = torch.zeros(1, 3, 16, 16)
    checker = flat.clone()
    checker[..., ::2, ::2], checker[..., 1::2, 1::2] = 1.0, 1.0
    checker[..., ::2, 1::2], checker[..., 1::2, ::2] = -1.0, -1.0
    assert consistency_distance(flat, checker, "pixels").item() == pytest.approx(1.0)
    assert consistency_distance(flat, checker, "lowpass").item() == pytest.approx(0.0, abs=1e-6)
    shape = flat.clone()
    shape[..., :8, :] = 1.0
    assert consistency_distance(flat, shape, "lowpass").item() == pytest.approx(0.5)


def test_consistency_fields_are_checked_against_the_schema():
    assert CDPGGAN(SCHEMA, CDPGGANConfig(**TINY)).consistency_weights() == {0: 1.0}
    assert CDPGGAN(SCHEMA, CDPGGANConfig(**TINY, consistency="category=0.5")).consistency_weights() == {0: 0.5}
    with pytest.raises(ValueError, match="consistency field 'shape' is not in the schema; allowed: category"):
        CDPGGAN(SCHEMA, CDPGGANConfig(**TINY, consistency="shape=1"))
    with pytest.raises(ValueError, match="allowed: pixels, lowpass, features"):
        CDPGGAN(SCHEMA, CDPGGANConfig(**TINY, consistency_space="edges"))
    with pytest.raises(ValueError, match="allowed: lse, wgan-gp-mismatch"):
        CPGGAN(SCHEMA, CPGGANConfig(**TINY, loss="hinge"))


@pytest.mark.parametrize("family, extra", [
    ("cpggan", {"loss": "lse"}), ("cpggan", {"loss": "wgan-gp-mismatch"}),
    ("cdpggan", {"consistency_space": "pixels"}), ("cdpggan", {"consistency_space": "features"}),
])
def test_training_walks_the_schedule_with_finite_losses_that_move(family, extra):
    torch.manual_seed(0)
    cls = CDPGGAN if family == "cdpggan" else CPGGAN
    g = cls(SCHEMA, cls.Config(**{**TINY, **extra}))
    trainer = CPGGANTrainer(g)
    real = torch.rand(16, 1, 28, 28) * 2 - 1
    cond = torch.eye(10)[torch.arange(16) % 10]
    history = []
    for _ in range(12):
        batch = trainer.batch_size
        history.append((batch, trainer.step(real[:batch], cond[:batch])))
    assert all(np.isfinite(v) for _, step in history for v in step.values())
    assert [h["resolution"] for _, h in history][0] == 7 and history[-1][1]["resolution"] == 28
    assert {b for b, h in history if h["resolution"] == 28} == {8}  # per-resolution batch size
    assert history[0][1]["loss_d"] != history[-1][1]["loss_d"] and history[0][1]["loss_g"] != history[-1][1]["loss_g"]
    if family == "cdpggan":
        assert all("consistency_category" in h for _, h in history)


@pytest.fixture(scope="module")
def progressive_models(tmp_path_factory, small_catalogue):
    root = tmp_path_factory.mktemp("progressive")
    for family in ("cpggan", "cdpggan"):
        train(TrainConfig(catalogue=small_catalogue, out=root / family, model=family, epochs=1, max_steps=5,
                          progress=False, model_overrides=TINY))
    return root


def test_checkpoint_reloads_to_identical_samples_and_resumes_at_its_phase(tmp_path, small_catalogue, progressive_models):
    model, manifest = load_generator(progressive_models / "cpggan")
    again, _ = load_generator(progressive_models / "cpggan")
    assert int(model.images_shown) == manifest["training"]["images_seen"] == 16 * 4 + 16  # 7 px x 2, 14 px x 3
    first = model.sample({"category": "Bag"}, 3, seed=4)
    assert first.shape == (3, 28, 28, 1)
    assert np.array_equal(first, again.sample({"category": "Bag"}, 3, seed=4))
    assert not np.array_equal(first, model.sample({"category": "Trouser"}, 3, seed=4))

    out = tmp_path / "resumed"
    common = dict(catalogue=small_catalogue, out=out, model="cpggan", max_steps=3, progress=False, model_overrides=TINY)
    train(TrainConfig(**common))
    train(TrainConfig(**common, resume=True))
    resumed, manifest = load_generator(out)
    assert int(resumed.images_shown) == manifest["training"]["images_seen"] == 16 * 6  # phase went on, not restarted
    assert resumed.phase() == (2, 0.0)  # 96 images: 7 px stable, 14 px fade + stable, 28 px fading in


def test_both_progressive_models_serve_through_grpc(small_index, progressive_models):
    service = RetrievalService.open(small_index, {"cpggan": progressive_models / "cpggan",
                                                  "cdpggan": progressive_models / "cdpggan"})
    server = start_server(service, "127.0.0.1:0")
    try:
        with AtelierClient(server.target) as client:
            schema = client.get_schema()
            assert [(m.name, m.family) for m in schema.models] == [("cpggan", "cpggan"), ("cdpggan", "cdpggan")]
            for name in ("cpggan", "cdpggan"):
                response = client.generate_and_retrieve({"category": "Dress"}, model=name, num_samples=2, top_k=5)
                assert len(response.products) == 5 and response.model == name
            with pytest.raises(grpc.RpcError) as error:
                client.generate_and_retrieve({"category": "Hat"}, model="cdpggan")
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=1)
