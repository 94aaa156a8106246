"""Checkpoints: a resumed run continues exactly, every family's optimizer state included."""

import pytest
import torch

from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.generator import FAMILIES
from atelier.generator.checkpoint import OptimizerState, load_extra, load_generator, save_checkpoint

SCHEMA = AttributeSchema((AttributeGroup("type", ("Shirt", "Dress", "Bag")), AttributeGroup("colour", ("Red", "Blue"))))
TINY = {
    "cgan": dict(image_size=8, g_width=4, d_width=4, latent_dim=8, embed_dim=4),
    "mcgan": dict(image_size=8, channels=1, g_width=4, d_width=4, latent_dim=8, embed_dim=4),
    "cvae": dict(image_size=8, width=4, latent_dim=4, embed_dim=4),
    "cpggan": dict(image_size=8, channels=1, g_width=4, d_width=4, max_width=8, latent_dim=8, embed_dim=4, ca_dim=4,
                   phase_images=8, batch_sizes="4:4"),
    "cdpggan": dict(image_size=8, channels=1, g_width=4, d_width=4, max_width=8, latent_dim=8, embed_dim=4, ca_dim=4,
                    phase_images=8, batch_sizes="4:4"),
    "flow": dict(image_size=8, channels=1, width=8, multipliers=(1, 2), embed_dim=4),
    "mcgan+pretrained": dict(image_size=8, channels=1, g_width=4, d_width=4, latent_dim=8, embed_dim=4,
                             discriminator="pretrained"),
    "cgan+recipes": dict(image_size=8, g_width=4, d_width=4, latent_dim=8, embed_dim=4, ema_decay=0.9,
                         augment="color,translation,cutout"),
}


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    condition = torch.zeros(4, 5)
    condition[torch.arange(4), torch.tensor([0, 1, 2, 0])] = 1
    condition[torch.arange(4), torch.tensor([3, 4, 3, 4])] = 1
    return images, condition


@pytest.mark.parametrize("name", sorted(TINY))
def test_resume_continues_exactly(name, tmp_path):
    cls = FAMILIES.get(name.split("+")[0])
    torch.manual_seed(0)
    model = cls(SCHEMA, cls.Config(**TINY[name])).train()
    trainer = cls.Trainer(model)
    for step in range(3):
        trainer.step(*batch(step))
    save_checkpoint(model, tmp_path / "ck", {"epochs": 1}, extra=trainer.extra_state())
    saved = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert any(n.startswith("optimizer") for n in saved), saved

    loaded, _ = load_generator(tmp_path / "ck")
    loaded.train()
    resumed = cls.Trainer(loaded)
    for extra, module in resumed.extra_state().items():
        assert load_extra(tmp_path / "ck", extra, module), extra
    for _ in range(2):  # the next steps of both, from the same random state, agree bit for bit
        seed = torch.seed()
        torch.manual_seed(seed)
        before = trainer.step(*batch(9))
        torch.manual_seed(seed)
        after = resumed.step(*batch(9))
        assert before == after
    same(model.state_dict(), loaded.state_dict(), "weights")
    for extra, module in trainer.extra_state().items():
        same(module.state_dict(), resumed.extra_state()[extra].state_dict(), extra)


def same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def test_optimizer_state_round_trips_through_tensors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    state = OptimizerState(opt).state_dict()
    assert set(state) == {"0.step", "0.exp_avg", "0.exp_avg_sq"} and all(torch.is_tensor(v) for v in state.values())
    q = torch.nn.Parameter(torch.ones(3))
    fresh = torch.optim.Adam([q], lr=0.1)
    OptimizerState(fresh).load_state_dict(state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])
    assert fresh.param_groups[0]["lr"] == 0.1
