"""Shared fixtures: small real datasets collected once per test session from live simulators."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def sim_data(tmp_path_factory):
    """Raw partition with 3 short random-policy episodes of two DMControl tasks at 16x16 pixels."""
    from mmbench2_lab.collect import collect
    out = tmp_path_factory.mktemp("sim_data")
    collect(["cheetah-run", "pendulum-swingup"], 3, out, policy="random", size=16, max_steps=30,
            seed=0, progress=False)
    return out


@pytest.fixture
def threads_1():
    """One intra-op thread, so float results do not depend on the machine's load."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
