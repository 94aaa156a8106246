"""The shared training recipes: the weights' moving average and differentiable augmentation."""

import pytest
import torch

from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.generator.cgan import CGAN, CGANConfig
from atelier.generator.recipes import cutout, diff_augment, ema_update, parse_policy, translation

SCHEMA = AttributeSchema((AttributeGroup("category", ("a", "b")),))


def test_ema_moves_parameters_and_copies_buffers():
    ema, trained = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        trained.weight.fill_(3.0)
        trained.running_mean.fill_(5.0)
    ema_update(ema, trained, decay=0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(ema.running_mean, trained.running_mean)  # statistics are copied, not averaged


def test_policy_parsing_names_what_is_allowed():
    assert parse_policy("color, translation,cutout") == ("color", "translation", "cutout") and parse_policy("") == ()
    with pytest.raises(ValueError, match="unknown augmentation flip; allowed: color, translation, cutout"):
        parse_policy("color,flip")


def test_translation_shifts_each_image_within_an_eighth_and_fills_zero():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 16, 16) + 1  # all > 0, so a fill shows as 0
    out = translation(images)
    for image, moved in zip(images, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(moved, _shifted(image, dy, dx))]
        assert matches, "every output is its input shifted by at most 2 px (1/8 of 16)"
    assert (out == 0).any() and not torch.equal(out, images)


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[:, max(-dy, 0):h - max(dy, 0),
                                                                          max(-dx, 0):w - max(dx, 0)]
    return out


def test_cutout_zeroes_one_square_and_keeps_the_rest():
    torch.manual_seed(1)
    images = torch.rand(32, 3, 8, 8) + 1
    out = cutout(images)
    for image, cut in zip(images, out):
        zero = (cut == 0).all(dim=0)
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4  # a square of half the side, clipped at the edges
        assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one solid rectangle
        assert torch.equal(cut[:, ~zero], image[:, ~zero])


def test_augmentation_is_differentiable():
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    diff_augment(images * 2 - 1, ("color", "translation", "cutout")).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_cgan_with_ema_serves_the_average_and_d_sees_augmented_images():
    torch.manual_seed(0)
    config = CGANConfig(image_size=8, g_width=4, d_width=4, latent_dim=8, embed_dim=4, ema_decay=0.5,
                        augment="translation,cutout")
    model = CGAN(SCHEMA, config).train()
    trainer = CGAN.Trainer(model)
    assert trainer.g is not model and "online" in trainer.extra_state()
    seen = []
    original = trainer.d.forward
    trainer.d.forward = lambda images, condition: (seen.append(images), original(images, condition))[1]
    before = [p.detach().clone() for p in model.parameters()]
    real = torch.rand(4, 1, 8, 8) + 0.5  # > 0 everywhere: cutout's zeros show
    trainer.step(real, torch.tensor([[1.0, 0.0]] * 4))
    assert (seen[0] == 0).any()  # the real batch D judged was augmented
    for served, old, trained in zip(model.parameters(), before, trainer.g.parameters()):
        assert torch.allclose(served, 0.5 * old + 0.5 * trained, atol=1e-6)
    plain = CGAN.Trainer(CGAN(SCHEMA, CGANConfig(image_size=8, g_width=4, d_width=4, latent_dim=8, embed_dim=4)))
    assert plain.g is plain.served and "online" not in plain.extra_state()  # the seed's recipe is unchanged
