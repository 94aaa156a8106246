"""Conditional flow matching: the loss by hand, guidance, EMA, exact resume, partial requests,
and serving (batched equals alone, over the real gRPC server)."""

import numpy as np
import pytest
import torch

from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.generator.checkpoint import load_extra, load_generator, save_checkpoint
from atelier.generator.flow import Flow, FlowConfig, flow_matching_loss, learning_rate, training_condition

SCHEMA = AttributeSchema((AttributeGroup("type", ("Shirt", "Dress", "Bag")), AttributeGroup("colour", ("Red", "Blue"))))
TINY = dict(image_size=8, channels=1, width=8, multipliers=(1, 2), embed_dim=4, sample_steps=3)


def tiny(**overrides) -> Flow:
    torch.manual_seed(0)
    model = Flow(SCHEMA, FlowConfig(**{**TINY, **overrides}))
    for p in model.parameters():  # the zero-initialised output layers would make every velocity 0
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def condition(*rows) -> torch.Tensor:
    return torch.from_numpy(np.stack([SCHEMA.encode(r, require_all=False) for r in rows]))


def test_loss_is_the_squared_error_to_the_straight_path_velocity():
    model = tiny()
    real, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    cond = condition({"type": "Shirt"}, {"colour": "Red"}, {}, {"type": "Bag", "colour": "Blue"})
    x_t = torch.stack([(1 - t[i]) * noise[i] + t[i] * real[i] for i in range(4)])
    expected = ((model.velocity(x_t, t, cond) - (real - noise)) ** 2).mean()
    assert torch.allclose(flow_matching_loss(model, real, cond, noise, t), expected)
    # at t = 1 the input is the real image itself, at t = 0 the noise
    assert torch.equal(x_t[3], real[3]) and torch.equal(x_t[0], noise[0])


def test_guidance_mixes_conditional_and_unconditional_velocities():
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7])
    cond = condition({"type": "Dress", "colour": "Red"}, {"type": "Bag"})
    base = tiny()
    v_c, v_u = base.velocity(x, t, cond), base.velocity(x, t, torch.zeros_like(cond))
    for w, expected in ((1.0, v_c), (0.0, v_u), (3.0, v_u + 3.0 * (v_c - v_u))):
        model = tiny(guidance=w)
        assert torch.allclose(model.guided_velocity(x, t, cond), expected, atol=1e-5)
    # composed: one pull per named group; a request naming one group is the joint guidance
    one = condition({"type": "Bag"})
    joint, composed = tiny(guidance=2.0), tiny(guidance=2.0, compose="groups")
    assert torch.allclose(joint.guided_velocity(x[:1], t[:1], one), composed.guided_velocity(x[:1], t[:1], one),
                          atol=1e-5)
    v_type = base.velocity(x[:1], t[:1], condition({"type": "Dress"}))
    v_colour = base.velocity(x[:1], t[:1], condition({"colour": "Red"}))
    expected = v_u[:1] + 2.0 * ((v_type - v_u[:1]) + (v_colour - v_u[:1]))
    assert torch.allclose(composed.guided_velocity(x[:1], t[:1], cond[:1]), expected, atol=1e-5)


def test_dropout_keeps_or_zeroes_whole_groups():
    torch.manual_seed(1)
    cond = condition(*[{"type": "Dress", "colour": "Blue"}] * 400)
    dropped = training_condition(cond, [3, 2], group_p=0.3, all_p=0.2)
    type_kept, colour_kept = dropped[:, :3].sum(1), dropped[:, 3:].sum(1)
    assert set(type_kept.tolist()) <= {0.0, 1.0} and set(colour_kept.tolist()) <= {0.0, 1.0}
    assert 0 < (type_kept == 0).float().mean() < 1 and ((type_kept == 0) & (colour_kept == 0)).any()
    assert torch.equal(training_condition(cond, [3, 2], 0.0, 0.0), cond)


def test_the_model_is_the_moving_average_of_the_trained_copy():
    model = tiny(ema_decay=0.5, warmup_steps=1)
    trainer = Flow.Trainer(model)
    before = [p.detach().clone() for p in model.parameters()]
    images, cond = torch.rand(4, 1, 8, 8) * 2 - 1, condition(*[{"type": "Shirt", "colour": "Red"}] * 4)
    trainer.step(images, cond)
    decay = min(0.5, 1 / 10)  # the first step's warm-up decay
    for ema, old, trained in zip(model.parameters(), before, trainer.online.parameters()):
        assert torch.allclose(ema, decay * old + (1 - decay) * trained, atol=1e-6)
    assert int(model.trained_steps) == int(trainer.online.trained_steps) == 1


def test_resume_continues_exactly_from_the_saved_weights_and_optimizer(tmp_path):
    model = tiny()
    trainer = Flow.Trainer(model)
    images, cond = torch.rand(8, 1, 8, 8) * 2 - 1, condition(*[{"type": "Bag", "colour": "Blue"}] * 8)
    for _ in range(3):
        trainer.step(images, cond)
    save_checkpoint(model, tmp_path / "ck", {"epochs": 1}, extra=trainer.extra_state())
    loaded, _ = load_generator(tmp_path / "ck")
    resumed = Flow.Trainer(loaded)
    for name, module in resumed.extra_state().items():
        assert load_extra(tmp_path / "ck", name, module), name
    assert int(resumed.opt.state_dict()["state"][0]["step"]) == 3
    torch.manual_seed(7)
    trainer.step(images, cond)
    torch.manual_seed(7)
    resumed.step(images, cond)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(trainer.online.parameters(), resumed.online.parameters()):
        assert torch.equal(a, b)


def test_the_cooldown_takes_the_learning_rate_linearly_to_zero():
    cfg = FlowConfig(lr=1e-3, warmup_steps=10, cooldown_start=100, cooldown_steps=50)
    assert learning_rate(cfg, 4) == pytest.approx(5e-4)  # warm-up
    assert learning_rate(cfg, 100) == pytest.approx(1e-3)  # constant up to the cool-down
    assert learning_rate(cfg, 125) == pytest.approx(5e-4)
    assert learning_rate(cfg, 150) == 0 and learning_rate(cfg, 400) == 0
    assert learning_rate(FlowConfig(lr=1e-3, warmup_steps=10), 10**6) == pytest.approx(1e-3)  # none set
    with pytest.raises(ValueError, match="cooldown_steps -1 must be a whole number of steps, at least 0"):
        Flow(SCHEMA, FlowConfig(**{**TINY, "cooldown_steps": -1}))


def test_a_resumed_run_may_change_its_schedule_but_not_its_network(flow_checkpoint, small_catalogue, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from atelier import artifacts
    from atelier.generator.train import TrainConfig, train

    fork = tmp_path / "cooled"
    shutil.copytree(artifacts.resolve(flow_checkpoint), fork)
    before = load_file(fork / "online.safetensors")
    common = dict(catalogue=small_catalogue, out=fork, model="flow", epochs=1, batch_size=16, max_steps=2,
                  progress=False, resume=True)
    with pytest.raises(ValueError, match=r"cannot change \['width'\] .*may change only: lr, cooldown_start"):
        train(TrainConfig(**common, model_overrides={"width": 16}))
    # the two trained steps were 0 and 1; the cool-down ends at step 2, so the next two steps are at rate 0
    train(TrainConfig(**common, model_overrides={"width": 8, "cooldown_start": 1, "cooldown_steps": 1}))
    cooled, manifest = load_generator(fork)
    assert (cooled.config.cooldown_start, cooled.config.cooldown_steps) == (1, 1)  # kept for the next resume
    assert int(cooled.trained_steps) == 4 and manifest["training"]["images_seen"] == 4 * 16
    after = load_file(artifacts.resolve(fork) / "online.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "trained_steps")


def test_a_request_may_name_any_subset_of_the_groups():
    model = tiny()
    assert model.accepts_partial
    for attributes in ({"type": "Dress"}, {"colour": "Red"}, {}, {"type": "Shirt", "colour": "Blue"}):
        images = model.sample(attributes, n=2, seed=3)
        assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
        assert np.array_equal(images, model.sample(attributes, n=2, seed=3))  # deterministic in the seed
    assert not np.array_equal(model.sample({"type": "Dress"}, 2, 3), model.sample({"type": "Bag"}, 2, 3))


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown solver 'rk9'; allowed: euler, midpoint, heun"):
        Flow(SCHEMA, FlowConfig(**{**TINY, "solver": "rk9"}))
    with pytest.raises(ValueError, match="cannot be halved"):
        Flow(SCHEMA, FlowConfig(**{**TINY, "image_size": 7}))
    with pytest.raises(ValueError, match="patch 3 must be at least 1 and divide image_size 8"):
        Flow(SCHEMA, FlowConfig(**{**TINY, "patch": 3}))


def test_a_patched_unet_runs_at_the_folded_size_and_keeps_pixels_apart():
    model = tiny(patch=2, channels=3)
    assert model.net.stem.in_channels == 12 and model.net.out.out_channels == 12
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.9])
    cond = condition({"type": "Dress"}, {})
    seen = []
    hook = model.net.stem.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    v = model.velocity(x, t, cond)
    hook.remove()
    assert seen == [torch.Size([2, 12, 4, 4])] and v.shape == x.shape
    # a change at one pixel reaches the output there; the other row of the batch is untouched
    x2 = x.clone()
    x2[0, :, 0, 0] += 1.0
    changed = (model.velocity(x2, t, cond) - v).abs().sum(dim=1)[0]
    assert changed[0, 0] > 0 and torch.equal(model.velocity(x2, t, cond)[1], v[1])
    images = model.sample({"type": "Bag"}, n=2, seed=1)
    assert images.shape == (2, 8, 8, 3)


@pytest.fixture(scope="module")
def flow_service(flow_checkpoint, small_index):
    from atelier.retrieval.service import RetrievalService

    return RetrievalService.open(small_index, {"flow": flow_checkpoint})


def test_flow_serves_batched_as_alone_and_over_grpc(flow_service):
    from atelier.retrieval.batching import BatchPolicy
    from atelier.retrieval.service import RetrievalRequest, RetrievalService
    from atelier.server.app import start_server
    from atelier.server.client import AtelierClient
    from tests.test_batching import all_at_once, same

    requests = [RetrievalRequest({"category": c}, num_samples=n, top_k=4, seed=s, return_images=True)
                for c, n, s in (("Coat", 3, 1), ("Bag", 6, 2), ("Sneaker", 1, 3))]

    def service(**policy):
        return RetrievalService(flow_service.index, flow_service.embedder, flow_service.models, flow_service.limits,
                                batching=BatchPolicy(**policy))

    alone = [service(max_wait_ms=0).generate_and_retrieve(r) for r in requests]
    together_service = service(max_wait_ms=60_000, max_batch_rows=10)
    together = all_at_once(together_service.generate_and_retrieve, requests)
    assert together_service.batchers["flow"].batches == 1
    for a, b in zip(alone, together):
        same(a, b)
    server = start_server(flow_service)
    try:
        with AtelierClient(server.target) as client:
            client.wait_ready()
            response = client.generate_and_retrieve({"category": "Coat"}, num_samples=3, top_k=4, seed=1,
                                                    return_images=True)
    finally:
        server.stop()
    assert [p.id for p in response.products] == [p.id for p in alone[0].products]
    assert len(response.images) == 3


def test_sampling_options_change_how_a_loaded_copy_draws_not_its_weights():
    model = tiny()
    fewer = tiny().with_sampling({"sample_steps": 1, "solver": "euler", "guidance": 1.0})
    assert fewer.config.sample_steps == 1 and fewer.config.width == model.config.width
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fewer.state_dict().values()))
    by_hand = tiny(sample_steps=1, solver="euler", guidance=1.0)
    assert np.array_equal(fewer.sample({"type": "Dress"}, 2, 5), by_hand.sample({"type": "Dress"}, 2, 5))
    assert not np.array_equal(fewer.sample({"type": "Dress"}, 2, 5), model.sample({"type": "Dress"}, 2, 5))
    with pytest.raises(ValueError, match=r"flow has no sampling option \['width'\]; its sampling options: "
                                         "sample_steps, solver, guidance, compose"):
        tiny().with_sampling({"width": 4})
    with pytest.raises(ValueError, match="unknown solver 'rk9'"):
        tiny().with_sampling({"solver": "rk9"})
    with pytest.raises(ValueError, match="sample_steps 2.5 must be a whole number"):
        tiny().with_sampling({"sample_steps": 2.5})


def test_one_checkpoint_serves_under_two_names_with_other_sampling(flow_checkpoint, small_index, capsys):
    from atelier.cli import main
    from atelier.retrieval.service import RetrievalRequest, RetrievalService

    service = RetrievalService.open(small_index, {"flow": flow_checkpoint, "flow-1": flow_checkpoint},
                                    sampling={"flow-1": {"sample_steps": 1}})
    assert service.models["flow-1"].generator.config.sample_steps == 1
    assert service.models["flow"].generator.config.sample_steps == 2
    assert service.models["flow-1"].manifest["sampling"] == {"sample_steps": 1}
    assert "sampling" not in service.models["flow"].manifest

    for loaded in service.models.values():  # two steps of training leave the velocity near zero: give it some
        torch.manual_seed(0)
        for parameter in loaded.generator.parameters():
            torch.nn.init.normal_(parameter, std=0.1)

    def drawings(name):
        return service.generate_and_retrieve(RetrievalRequest(
            {"category": "Coat"}, model=name, num_samples=2, top_k=3, seed=4, return_images=True)).images

    assert not np.array_equal(np.stack(drawings("flow")), np.stack(drawings("flow-1")))
    with pytest.raises(ValueError, match=r"sampling options for unknown model\(s\) \['nope'\]"):
        RetrievalService.open(small_index, {"flow": flow_checkpoint}, sampling={"nope": {"sample_steps": 1}})
    # the command line says which models there are, and which options the family has
    base = ["serve", "--index", str(small_index), "--model", f"flow={flow_checkpoint}", "--address", "127.0.0.1:0"]
    assert main([*base, "--sampling", "nope:sample_steps=1"]) == 2
    assert "--sampling names model 'nope'; the --model names are flow" in capsys.readouterr().err
    assert main([*base, "--sampling", "flow:width=4"]) == 2
    assert "flow has no sampling option ['width']" in capsys.readouterr().err
