import numpy as np
import pytest
import torch

from tests.factories import tiny_resnet


@pytest.fixture
def tiny_model():
    """A seeded 5-class tiny ResNet in eval mode."""
    torch.manual_seed(0)
    return tiny_resnet(num_classes=5).eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: starting Ray costs seconds."""
    import ray

    from dap_ray.ray_setup import init_ray

    init_ray(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
