"""flow_sigmas: the flow-matching sigma grid, the stock pipeline's (default) or FlowBP's training grid."""

import numpy as np
import pytest
import torch
from small_runs import small_config

from alignprop import models
from alignprop.errors import UserError


def sigmas_of(name: str, grid: str, steps: int = 25) -> torch.Tensor:
    model = models.load_model(name)
    model.set_sigma_grid(grid)
    model.set_timesteps(steps, "cpu")
    return model.scheduler.sigmas, model


def test_flowbp_grid_on_sd3_is_the_shifted_linspace():
    """FlowBP's SD3.5 rollouts (flowbp/trainers/sd35/leapalign.py:100-126): shift 3 applied to linspace(1, 1/N, N),
    last sigma 0.111 at 25 steps, where the stock pipeline's is about 0.009."""
    flowbp, model = sigmas_of("tiny_sd3", "flowbp")
    pipeline, _ = sigmas_of("tiny_sd3", "pipeline")
    shift = model.scheduler.config.shift
    s = np.linspace(1.0, 1 / 25, 25)
    expected = torch.tensor(np.append(shift * s / (1 + (shift - 1) * s), 0.0), dtype=torch.float32)
    assert torch.allclose(flowbp, expected, atol=1e-6)
    assert not torch.allclose(pipeline, expected, atol=1e-3)


def test_flux_pipeline_grid_already_is_flowbps():
    flowbp, _ = sigmas_of("tiny_flux", "flowbp")
    pipeline, _ = sigmas_of("tiny_flux", "pipeline")
    assert torch.equal(flowbp, pipeline)


def test_ddim_models_refuse_it_in_one_line(preset, tmp_path):
    from alignprop.jobs import run_job

    config = small_config(preset, tmp_path, flow_sigmas="flowbp")
    with pytest.raises(UserError) as error:
        run_job(config)
    assert "flow_sigmas" in str(error.value) and "\n" not in str(error.value)
    logs = tmp_path / "logs"
    assert not logs.exists() or not any(logs.iterdir())
