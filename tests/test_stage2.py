"""StackGAN stage 2: a frozen stage 1, the matching-aware loss, self-contained checkpoints, serving."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atelier import artifacts
from atelier.catalog.fashion_product_images import APPAREL_6X6_COLOURS, APPAREL_6X6_TYPES, import_fashion_product_images
from atelier.catalog.images import decode_image
from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.generator import load_generator
from atelier.generator.conditioning import kl_to_standard_normal as ca_kl
from atelier.generator.conditioning import mismatched
from atelier.generator.mcgan import MCGANConfig
from atelier.generator.stage2 import Stage2, Stage2Config, Stage2Trainer, discriminator_loss, generator_loss
from atelier.generator.train import TrainConfig, grid_conditions, prepare_data, sample_grid, start_run, train

STAGE1 = {"g_width": 4, "d_width": 8, "embed_dim": 8, "latent_dim": 16}
TINY = {"g_width": 4, "d_width": 8, "ca_dim": 8, "res_blocks": 1}
SCHEMA = AttributeSchema((AttributeGroup("type", APPAREL_6X6_TYPES), AttributeGroup("colour", APPAREL_6X6_COLOURS)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fpi_parquet):
    """A 64 px apparel catalogue, and a tiny 32 px MCGAN (stage 1) trained 2 steps on it."""
    root = tmp_path_factory.mktemp("stage2")
    catalogue = import_fashion_product_images(fpi_parquet, root / "apparel", "apparel-6x6", size=64, limit=200,
                                              progress=False)
    train(TrainConfig(catalogue=root / "apparel", out=root / "mcgan", model="mcgan", image_size=32, epochs=1,
                      batch_size=16, max_steps=2, split=None, progress=False, model_overrides=STAGE1))
    return root, catalogue


@pytest.fixture(scope="module")
def whole_shop(stack, fpi_parquet):
    """apparel-6x6-all: the same groups plus `other` values, so another schema than stage 1's."""
    root, _ = stack
    import_fashion_product_images(fpi_parquet, root / "all", "apparel-6x6-all", size=32, limit=300, progress=False)
    return root / "all"


def conditions_for(schema, n):
    rows = [{"type": APPAREL_6X6_TYPES[i % 6], "colour": APPAREL_6X6_COLOURS[(i // 2) % 6]} for i in range(n)]
    return torch.from_numpy(np.stack([schema.encode(r) for r in rows]))


@pytest.mark.parametrize("size", [128, 256])
def test_shapes_at_128_and_256_from_a_64_px_stage1(size):
    torch.manual_seed(0)
    stage1 = {"family": "mcgan", "config": dataclasses.asdict(MCGANConfig(image_size=64, **STAGE1))}  # random init
    model = Stage2(SCHEMA, Stage2Config(image_size=size, stage1=stage1))
    assert model.latent_dim == 16 and model.accepts_partial and model.config.condition_dropout == 0.1  # stage 1's
    cond = conditions_for(SCHEMA, 2)
    model.train()
    images = model(torch.randn(2, 16), cond)
    assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
    assert model.make_discriminator()(images, cond).shape == (2,)


def test_sizes_and_channels_are_validated():
    stage1 = {"family": "mcgan", "config": dataclasses.asdict(MCGANConfig(image_size=64, **STAGE1))}
    with pytest.raises(ValueError, match=r"must be 64 \* 2\*\*k"):
        Stage2(SCHEMA, Stage2Config(image_size=96, stage1=stage1))
    with pytest.raises(ValueError, match="larger than stage 1's 64 px"):
        Stage2(SCHEMA, Stage2Config(image_size=64, stage1=stage1))
    with pytest.raises(ValueError, match="3-channel images"):
        Stage2(SCHEMA, Stage2Config(channels=1, stage1=stage1))
    with pytest.raises(ValueError, match="needs a stage-1 model"):
        Stage2(SCHEMA, Stage2Config())
    cgan = {"family": "cgan", "config": {"image_size": 64, "channels": 3, **STAGE1}}
    with pytest.raises(ValueError, match="takes partial requests"):
        Stage2(SCHEMA, Stage2Config(stage1=cgan, condition_dropout=0.1))
    assert Stage2(SCHEMA, Stage2Config(stage1=cgan, **TINY)).config.condition_dropout == 0.0


def test_stage2_trains_while_stage1_stays_frozen(stack):
    root, catalogue = stack
    torch.manual_seed(0)
    model = Stage2(catalogue.schema, Stage2Config(image_size=64, stage1=str(root / "mcgan"), **TINY))
    source, _ = load_generator(root / "mcgan")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.stage1.state_dict().items())  # copied in
    images, conditions, _ = prepare_data(catalogue, None, 64, None)
    assert images.shape[1:] == (3, 64, 64)

    stage1_before = {k: v.clone() for k, v in model.stage1.state_dict().items()}  # BN running stats included
    stage2_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("stage1.")}
    trainer = Stage2Trainer(model)
    model.train()
    assert not model.stage1.training and model.encoder.training
    assert not any(p.requires_grad for p in model.stage1.parameters())
    optimised = {id(p) for group in trainer.opt_g.param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if not n.startswith("stage1.")}

    losses = [trainer.step(images[i * 16 : (i + 1) * 16], conditions[i * 16 : (i + 1) * 16]) for i in range(4)]
    assert all(np.isfinite(v) for step in losses for v in step.values())
    assert losses[0]["loss_d"] != losses[-1]["loss_d"] and losses[0]["loss_g"] != losses[-1]["loss_g"]
    assert all(torch.equal(v, stage1_before[k]) for k, v in model.stage1.state_dict().items())
    after = dict(model.named_parameters())
    for name in ("encoder.0.weight", "ca.fc.weight", "joint.0.weight", "residual.0.body.0.weight",
                 "upsample.1.weight", "to_image.0.weight"):
        assert not torch.equal(after[name], stage2_before[name]), name

    model.eval()
    z, cond = torch.randn(3, 16), conditions[:3]
    out = model(z, cond)
    assert out.shape == (3, 3, 64, 64) and out.abs().max() <= 1
    assert torch.equal(out, model(z, cond))  # eval: c = mu, a seed always draws the same image
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(z, cond), model(z, cond))  # training: c = mu + sigma * eps
    sample = model.sample({"colour": "Red"}, 2, seed=3)  # partial, as stage 1 allows
    assert sample.dtype == np.uint8 and sample.shape == (2, 64, 64, 3)
    assert np.array_equal(sample, model.sample({"colour": "Red"}, 2, seed=3))


def test_source_real_learns_from_shrunk_real_images_without_running_stage1(stack):
    root, catalogue = stack
    torch.manual_seed(0)
    model = Stage2(catalogue.schema, Stage2Config(image_size=64, stage1=str(root / "mcgan"), source="real", **TINY))
    assert model.config.l1_weight == 100.0 and model.config.source_noise == 0.1  # pix2pix's weight by default
    images, conditions, _ = prepare_data(catalogue, None, 64, None)
    low = model.shrink(images[:4])
    assert low.shape == (4, 3, 32, 32)  # stage 1's size: the tiny MCGAN draws 32 px
    clean = torch.nn.functional.interpolate(images[:4], size=(32, 32), mode="area")
    assert 0.08 < (low - clean).std().item() < 0.12  # the noise conditioning augmentation

    def refuse(*_):
        raise AssertionError("stage 1 ran during source=real training")

    forward, model.stage1.forward = model.stage1.forward, refuse
    trainer = Stage2Trainer(model)
    model.train()
    before = model.to_image[0].weight.detach().clone()
    losses = [trainer.step(images[i * 16 : (i + 1) * 16], conditions[i * 16 : (i + 1) * 16]) for i in range(3)]
    assert all(np.isfinite(v) for step in losses for v in step.values()) and losses[0]["l1"] > 0
    assert not torch.equal(model.to_image[0].weight, before)
    model.stage1.forward = forward
    model.eval()
    assert model(torch.randn(2, 16), conditions[:2]).shape == (2, 3, 64, 64)  # serving refines stage 1's drawing

    plain = Stage2Trainer(Stage2(catalogue.schema, Stage2Config(image_size=64, stage1=str(root / "mcgan"), **TINY)))
    assert plain.l1_weight == 0.0 and plain.step(images[:16], conditions[:16])["l1"] == 0.0
    with pytest.raises(ValueError, match="source 'fake' is not one of stage1, real"):
        Stage2(catalogue.schema, Stage2Config(image_size=64, stage1=str(root / "mcgan"), source="fake"))
    with pytest.raises(ValueError, match="l1_weight and source_noise must be >= 0"):
        Stage2(catalogue.schema, Stage2Config(image_size=64, stage1=str(root / "mcgan"), source="real", l1_weight=-1))


def mean(xs):
    return sum(xs) / len(xs)


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_matching_aware_losses_and_kl_by_hand():
    real_right, fake_right, real_wrong = [2.0, -0.5, 0.3], [0.7, -1.2, 0.0], [1.5, -2.0, 0.4]
    expected_d = mean([bce(x, 1) for x in real_right]) + 0.5 * (
        mean([bce(x, 0) for x in fake_right]) + mean([bce(x, 0) for x in real_wrong]))
    loss_d = discriminator_loss(t(real_right), t(fake_right), t(real_wrong))
    assert loss_d.item() == pytest.approx(expected_d, rel=1e-12)

    mu, logvar = [[0.5, -1.0], [0.0, 2.0]], [[0.0, 0.5], [-1.0, 0.3]]
    terms = [1 + lv - m**2 - math.exp(lv) for mr, lr in zip(mu, logvar) for m, lv in zip(mr, lr)]
    expected_kl = -0.5 * mean(terms)
    kl = ca_kl(t(mu), t(logvar))
    assert kl.item() == pytest.approx(expected_kl, rel=1e-12)
    assert ca_kl(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0  # N(0, I) itself

    expected_g = mean([bce(x, 1) for x in fake_right]) + 2.0 * expected_kl
    assert generator_loss(t(fake_right), kl, 2.0).item() == pytest.approx(expected_g, rel=1e-12)

    condition = torch.eye(3)
    wrong, differs = mismatched(condition)
    assert torch.equal(wrong, condition[[2, 0, 1]]) and differs.all()  # rolled by one


def test_train_saves_a_self_contained_checkpoint_that_reloads_and_resumes(stack, tmp_path):
    root, catalogue = stack
    source = tmp_path / "stage1-copy"  # a copy we can delete afterwards
    shutil.copytree(artifacts.resolve(root / "mcgan"), source)
    stage1, stage1_manifest = load_generator(source)
    out = tmp_path / "stage2"
    common = dict(catalogue=root / "apparel", out=out, model="stage2", epochs=1, batch_size=16, max_steps=2,
                  split=None, progress=False)
    train(TrainConfig(**common, model_overrides={"stage1": str(source), **TINY}))
    shutil.rmtree(source)

    folder = artifacts.resolve(out)
    config = json.loads((folder / "config.json").read_text())
    assert config["family"] == "stage2" and config["config"]["image_size"] == 64
    recorded = config["config"]["stage1"]
    assert recorded["family"] == "mcgan" and recorded["path"] == str(source)
    assert recorded["config"] == dataclasses.asdict(stage1.config)
    assert recorded["weights_sha256"] == stage1_manifest["weights_sha256"]
    weights = load_file(folder / "weights.safetensors")
    assert all(torch.equal(weights[f"stage1.{k}"], v) for k, v in stage1.state_dict().items())

    model, _ = load_generator(out)  # stage 1's source is gone: the checkpoint holds it
    again, _ = load_generator(out)
    assert isinstance(model, Stage2) and model.config.stage1 == recorded
    _, _, attrs = prepare_data(catalogue, None, None, None)
    grid_conds, _ = grid_conditions(catalogue.schema, attrs)
    grid = sample_grid(model, grid_conds, 8, seed=0)
    assert np.array_equal(grid, decode_image((folder / "samples.png").read_bytes(), 3))  # == the trained model's
    assert np.array_equal(model.sample({"type": "Dress"}, 3, seed=7), again.sample({"type": "Dress"}, 3, seed=7))

    train(TrainConfig(**common, resume=True, model_overrides=TINY))  # stage 1 comes from the checkpoint
    resumed, manifest = load_generator(out)
    assert manifest["training"]["images_seen"] == 2 * 2 * 16
    assert all(torch.equal(v, stage1.state_dict()[k]) for k, v in resumed.stage1.state_dict().items())
    assert (artifacts.resolve(out) / "discriminator.safetensors").is_file()

    # the first command again with --resume: the same stage-1 weights pass, other weights do not
    train(TrainConfig(**common, resume=True, model_overrides={"stage1": str(root / "mcgan"), **TINY}))
    assert load_generator(out)[1]["training"]["images_seen"] == 3 * 2 * 16
    other = tmp_path / "other-stage1"
    train(TrainConfig(catalogue=root / "apparel", out=other, model="mcgan", image_size=32, max_steps=1, batch_size=16,
                      split=None, progress=False, model_overrides=STAGE1))
    with pytest.raises(ValueError, match=r"cannot change \['stage1'\]"):
        train(TrainConfig(**common, resume=True, model_overrides={"stage1": str(other), **TINY}))


def test_a_fine_tune_of_a_source_real_stage2_may_take_another_stage1(stack, tmp_path):
    root, catalogue = stack
    common = dict(catalogue=root / "apparel", model="stage2", epochs=1, batch_size=16, max_steps=1, split=None,
                  progress=False)
    refiner = tmp_path / "refiner"
    train(TrainConfig(**common, out=refiner, model_overrides={"stage1": str(root / "mcgan"), "source": "real", **TINY}))
    longer = tmp_path / "mcgan-longer"  # the same stage 1 trained further: other weights, same shape
    train(TrainConfig(catalogue=root / "apparel", out=longer, model="mcgan", image_size=32, epochs=1, batch_size=16,
                      max_steps=1, split=None, progress=False, init=root / "mcgan", model_overrides=STAGE1))
    longer_model, longer_manifest = load_generator(longer)
    before, _ = load_generator(refiner)

    cfg = TrainConfig(**common, out=tmp_path / "swapped", init=refiner, model_overrides={"stage1": str(longer)})
    run = start_run(cfg, catalogue, torch.device("cpu"), [], channels=3, image_size=64)
    assert all(torch.equal(v, longer_model.state_dict()[k]) for k, v in run.model.stage1.state_dict().items())
    refined = {k: v for k, v in run.model.state_dict().items() if not k.startswith("stage1.")}
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in refined.items())  # the refiner is the one trained
    assert not any(p.requires_grad for p in run.model.stage1.parameters()) and not run.model.stage1.training

    train(cfg)
    swapped, manifest = load_generator(tmp_path / "swapped")
    assert swapped.config.stage1["weights_sha256"] == longer_manifest["weights_sha256"]
    assert manifest["training"]["init_from"]["path"] == str(refiner)
    assert all(torch.equal(v, longer_model.state_dict()[k]) for k, v in swapped.stage1.state_dict().items())

    # a resume keeps its stage 1, and a stage 2 trained on stage 1's own drawings keeps it on a fine-tune too
    with pytest.raises(ValueError, match=r"cannot change \['stage1'\].*resumed run may change only: none"):
        train(TrainConfig(**common, out=refiner, resume=True, model_overrides={"stage1": str(longer)}))
    plain = tmp_path / "plain"
    train(TrainConfig(**common, out=plain, model_overrides={"stage1": str(root / "mcgan"), **TINY}))
    with pytest.raises(ValueError, match=r"cannot change \['stage1'\].*fine-tuned run may change only: none"):
        train(TrainConfig(**common, out=tmp_path / "p2", init=plain, model_overrides={"stage1": str(longer)}))
    flow = tmp_path / "flow"  # another family is fine, another size is not: the refiner learned from 32 px inputs
    train(TrainConfig(catalogue=root / "apparel", out=flow, model="flow", image_size=16, epochs=1, batch_size=16,
                      max_steps=1, split=None, progress=False, model_overrides={"width": 8, "channels": 3}))
    with pytest.raises(ValueError, match=r"draws \(size, channels, partial requests\) \(16, 3, True\); "
                                         r"this stage 2 was trained for \(32, 3, True\)"):
        train(TrainConfig(**common, out=tmp_path / "f2", init=refiner, model_overrides={"stage1": str(flow)}))
    assert not (tmp_path / "p2").exists() and not (tmp_path / "f2").exists()


def test_sampling_options_are_stage1s():
    flow = {"family": "flow", "config": {"image_size": 32, "channels": 3, "width": 8, "sample_steps": 2}}
    model = Stage2(SCHEMA, Stage2Config(image_size=64, stage1=flow, **TINY)).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh flow's last layer is zero, so guidance would change nothing
        for p in model.stage1.parameters():
            p.normal_(0, 0.1)
    assert model.sampling() == model.stage1.sampling() and model.sampling()["guidance"] != 3
    z, condition = torch.randn(2, model.latent_dim), conditions_for(SCHEMA, 2)
    plain = model.stage1(z, condition)  # what stage 2 refines
    model.with_sampling({"guidance": 3})
    assert model.stage1.config.guidance == 3 and model.sampling()["guidance"] == 3
    assert not torch.equal(plain, model.stage1(z, condition))
    mcgan = {"family": "mcgan", "config": dataclasses.asdict(MCGANConfig(image_size=64, **STAGE1))}
    with pytest.raises(ValueError, match="stage2's sampling options are its stage 1's: mcgan has no sampling option"):
        Stage2(SCHEMA, Stage2Config(image_size=128, stage1=mcgan, **TINY)).with_sampling({"guidance": 3})


def test_stage1_of_another_schema_is_refused(stack, whole_shop, tmp_path):
    root, _ = stack
    with pytest.raises(ValueError, match="trained on another schema than stage 2's catalogue: attribute 'type'"):
        train(TrainConfig(catalogue=whole_shop, out=tmp_path / "m", model="stage2", image_size=64, batch_size=16,
                          max_steps=1, split=None, progress=False,
                          model_overrides={"stage1": str(root / "mcgan"), **TINY}))
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="stage 1 must be a single-stage model"):
        Stage2(SCHEMA, Stage2Config(stage1={"family": "stage2", "config": {}}))


def test_served_as_mcgan_plus_stage2_beside_its_stage1(stack, whole_shop, mobilenet_weights):
    from atelier.indexer.runner import reindex
    from atelier.retrieval.service import RetrievalService
    from atelier.server.app import start_server
    from atelier.server.client import AtelierClient

    root, _ = stack
    train(TrainConfig(catalogue=root / "apparel", out=root / "stage2", model="stage2", epochs=1, batch_size=16,
                      max_steps=2, split=None, progress=False, model_overrides={"stage1": str(root / "mcgan"), **TINY}))
    reindex(whole_shop, root / "index", input_size=32, progress=False)
    service = RetrievalService.open(root / "index", {"mcgan": root / "mcgan", "mcgan+stage2": root / "stage2"})
    server = start_server(service)
    try:
        with AtelierClient(server.target) as client:
            schema = client.get_schema()
            assert [(m.name, m.family, m.image_size) for m in schema.models] == [
                ("mcgan", "mcgan", 32), ("mcgan+stage2", "stage2", 64)]
            both = client.generate_and_retrieve({"type": "Topwear", "colour": "Blue"}, model="mcgan+stage2",
                                                num_samples=2, top_k=5, seed=1, return_images=True)
            assert both.model == "mcgan+stage2" and len(both.products) == 5
            assert all(set(p.attributes) == {"type", "colour"} for p in both.products)
            partial = client.generate_and_retrieve({"colour": "Red"}, model="mcgan+stage2", num_samples=2, top_k=5,
                                                   seed=1)  # stage 1 takes partial requests, so stage 2 does
            assert len(partial.products) == 5
    finally:
        server.stop(grace=1)
