"""`atelier distill`: the one-step loss by hand, the teacher's pairs (the drawings serving would
give, kept and reused), the student checkpoint, exact resume, and what is refused."""

import pytest
import torch
from safetensors.torch import load_file

from atelier.generator.checkpoint import load_generator, save_checkpoint
from atelier.generator.distill import DistillConfig, distill, one_step_loss, pair_conditions, sampling_tag
from atelier.generator.flow import Flow, FlowConfig
from tests.test_flow import SCHEMA, TINY, condition


@pytest.fixture(scope="module")
def teacher(flow_checkpoint):  # the shared tiny flow (conftest) is the teacher
    return flow_checkpoint


def test_the_loss_is_one_euler_step_from_the_noise_against_the_teacher():
    torch.manual_seed(0)
    model = Flow(SCHEMA, FlowConfig(**TINY))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    noise, target = torch.randn(3, 1, 8, 8), torch.rand(3, 1, 8, 8) * 2 - 1
    cond = condition({"type": "Dress"}, {"colour": "Red"}, {})
    velocity = model.velocity(noise, torch.zeros(3), cond)
    assert torch.allclose(one_step_loss(model, noise, cond, target), ((noise + velocity - target) ** 2).mean())


def test_the_student_learns_from_the_drawings_serving_gives_and_keeps_them(teacher, small_catalogue, tmp_path):
    out = tmp_path / "student"
    cfg = DistillConfig(teacher=teacher, catalogue=small_catalogue, out=out, pairs=48, epochs=1, batch_size=16,
                        chunk=20, progress=False, command="atelier distill (test)")
    distill(cfg)
    student, manifest = load_generator(out)
    assert student.family == "flow" and (student.config.sample_steps, student.config.solver,
                                         student.config.guidance) == (1, "euler", 1.0)
    record = manifest["training"]
    assert record["images_seen"] == 48 and record["rows"] == 48
    assert record["init_from"]["path"] == str(teacher) and record["init_from"]["distilled"]["pairs"] == 48
    assert record["init_from"]["distilled"]["teacher_sampling"]["sample_steps"] == 2
    chunks = sorted((tmp_path / "student.pairs").glob("pairs-*.safetensors"))
    assert [c.name.rsplit("-", 2)[-1] for c in chunks] == ["20.safetensors", "20.safetensors", "8.safetensors"]
    # pair i is what serving draws for its condition with seed i
    model, _ = load_generator(teacher)
    first = load_file(chunks[1])
    served = model.sample_conditions(first["condition"][:3].numpy(), [20, 21, 22])
    drawn = ((first["drawing"][:3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert (served == drawn).all()
    # some conditions leave the group out, as the teacher was trained (the student takes any subset)
    from atelier.catalog.catalogue import Catalogue
    from atelier.generator.train import prepare_data

    _, rows, _ = prepare_data(Catalogue.open(small_catalogue), "train", None, None)
    wanted = pair_conditions(model, rows, 400, 0)
    assert 0 < int((wanted.sum(dim=1) == 0).sum()) < 400
    # a second run reads the pairs back instead of drawing them again
    stamps = [c.stat().st_mtime_ns for c in chunks]
    distill(DistillConfig(**{**cfg.__dict__, "out": out, "resume": True}))
    assert [c.stat().st_mtime_ns for c in chunks] == stamps


def test_the_teacher_may_draw_with_other_sampling_and_its_pairs_are_kept_apart(teacher, small_catalogue, tmp_path):
    out = tmp_path / "student"
    common = dict(teacher=teacher, catalogue=small_catalogue, out=out, pairs=16, epochs=1, batch_size=16,
                  progress=False)
    distill(DistillConfig(**common))
    distill(DistillConfig(**common, teacher_sampling={"guidance": 1.0}, resume=False))
    chunks = sorted((tmp_path / "student.pairs").glob("pairs-*.safetensors"))
    default, _ = load_generator(teacher)
    unguided, manifest = load_generator(teacher, sampling={"guidance": 1.0})
    tags = {sampling_tag(default), sampling_tag(unguided)}
    assert len(tags) == 2 and {c.name.split("-")[2] for c in chunks} == tags
    drawn = load_file(next(c for c in chunks if sampling_tag(unguided) in c.name))
    served = unguided.sample_conditions(drawn["condition"][:2].numpy(), [0, 1])
    assert (served == ((drawn["drawing"][:2] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()).all()
    _, student_manifest = load_generator(out)
    assert student_manifest["training"]["init_from"]["distilled"]["teacher_sampling"]["guidance"] == 1.0
    with pytest.raises(ValueError, match="flow has no sampling option \\['width'\\]"):
        distill(DistillConfig(**common, teacher_sampling={"width": 3}))


def test_resume_at_an_epoch_boundary_continues_exactly(teacher, small_catalogue, tmp_path):
    common = dict(teacher=teacher, catalogue=small_catalogue, pairs=32, batch_size=16, progress=False)
    distill(DistillConfig(out=tmp_path / "once", epochs=2, **common))
    distill(DistillConfig(out=tmp_path / "twice", epochs=1, **common))
    distill(DistillConfig(out=tmp_path / "twice", epochs=1, resume=True, **common))
    once, _ = load_generator(tmp_path / "once")
    twice, manifest = load_generator(tmp_path / "twice")
    assert manifest["training"]["epochs"] == 2 and manifest["training"]["images_seen"] == 64
    for (name, a), b in zip(once.state_dict().items(), twice.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_only_a_flow_is_distilled_and_pairs_fill_a_batch(teacher, tiny_model, small_catalogue, tmp_path):
    with pytest.raises(ValueError, match="holds a 'cgan' model; only a flow can be distilled"):
        distill(DistillConfig(teacher=tiny_model, catalogue=small_catalogue, out=tmp_path / "s", progress=False))
    with pytest.raises(ValueError, match="--pairs 8 is fewer than one batch of 16"):
        distill(DistillConfig(teacher=teacher, catalogue=small_catalogue, out=tmp_path / "s", pairs=8, batch_size=16,
                              progress=False))
    assert not (tmp_path / "s").exists()


def test_the_student_does_not_inherit_the_teachers_cooldown(teacher, small_catalogue, tmp_path):
    import dataclasses

    model, manifest = load_generator(teacher)
    model.config = dataclasses.replace(model.config, cooldown_start=0, cooldown_steps=1)  # rate 0 from step 1
    save_checkpoint(model, tmp_path / "cooled", manifest["training"])
    out = tmp_path / "student"
    distill(DistillConfig(teacher=tmp_path / "cooled", catalogue=small_catalogue, out=out, pairs=32, epochs=1,
                          batch_size=16, chunk=32, progress=False, command="atelier distill (test)"))
    student, _ = load_generator(out)
    assert (student.config.cooldown_start, student.config.cooldown_steps) == (0, 0)
    assert int(student.trained_steps) == 2
