"""RetrievalService in process: which models and indexes combine, and what a request may ask."""

import pytest

from atelier.catalog.fashion_mnist import CLASS_NAMES
from atelier.catalog.schema import AttributeGroup, AttributeSchema
from atelier.generator import save_checkpoint
from atelier.generator.cgan import CGAN, CGANConfig
from atelier.retrieval import stages
from atelier.retrieval.service import IncompatibleArtifacts, InvalidRequest, RetrievalRequest, RetrievalService

TINY = dict(g_width=8, d_width=8, embed_dim=8, latent_dim=16)


def _model(tmp_path, values, name):
    schema = AttributeSchema((AttributeGroup("category", tuple(values)),))
    save_checkpoint(CGAN(schema, CGANConfig(**TINY)), tmp_path / name)
    return tmp_path / name


def test_a_model_of_a_selection_serves_a_wider_index(tmp_path, small_index):
    model = _model(tmp_path, CLASS_NAMES[:3], "three")
    service = RetrievalService.open(small_index, {"three": model})
    result = service.generate_and_retrieve(RetrievalRequest({"category": "Pullover"}, top_k=3, seed=1))
    assert len(result.products) == 3
    with pytest.raises(InvalidRequest, match="unknown value 'Bag' for attribute 'category'; allowed: T-shirt/top, Trouser, Pullover$"):
        service.generate_and_retrieve(RetrievalRequest({"category": "Bag"}))


def test_a_model_asking_for_values_the_index_lacks_is_refused(tmp_path, small_index):
    model = _model(tmp_path, [*CLASS_NAMES, "Scarf"], "scarf")
    with pytest.raises(IncompatibleArtifacts, match=r"'category' has values \['Scarf'\] that the other schema lacks"):
        RetrievalService.open(small_index, {"scarf": model})


def test_requests_are_reproducible_and_images_returned_only_when_asked(service):
    a = service.generate_and_retrieve(RetrievalRequest({"category": "Coat"}, num_samples=2, top_k=4, seed=9))
    b = service.generate_and_retrieve(RetrievalRequest({"category": "Coat"}, num_samples=2, top_k=4, seed=9,
                                                       return_images=True))
    assert [p.id for p in a.products] == [p.id for p in b.products] and a.seed == 9
    assert not a.images and len(b.images) == 2 and b.images[0].shape == (28, 28, 1)
    assert list(a.timings_ms) == list(stages.IN_PROCESS)  # every stage the service runs, in order
