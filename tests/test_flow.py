"""The flow maths against diffusers' own AuraFlow sampler: same timestep, same Euler step, same shift."""
import math

import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

from job import flow


def test_transformer_timestep_matches_the_pipeline(tiny_model):
    pipe = AuraFlowPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    pipe("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=1.0, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    sigmas = pipe.scheduler.sigmas[:-1]  # the sigma of each step the sampler evaluated
    ours = flow.model_timestep(sigmas)
    assert len(seen) == 4
    torch.testing.assert_close(torch.stack([t[0] for t in seen]).float(), ours.float(), rtol=0, atol=1e-6)


def test_the_schedulers_step_with_our_velocity_moves_along_our_noising_path():
    """Our (noised, velocity_target) convention is the one the sampler integrates: one scheduler step with the exact
    velocity goes from the noised latent at sigma_i to the noised latent at sigma_i+1."""
    sched = FlowMatchEulerDiscreteScheduler(shift=1.73)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    here = flow.noised(x0, noise, sched.sigmas[3:4])
    got = sched.step(flow.velocity_target(x0, noise), sched.timesteps[3], here, return_dict=False)[0]
    torch.testing.assert_close(got, flow.noised(x0, noise, sched.sigmas[4:5]), rtol=0, atol=1e-5)


def test_shift_is_the_schedulers_shift():
    base = torch.linspace(1.0, 0.05, 20)
    for shift in (0.5, 1.0, 1.73, 3.0):
        want = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas  # shift applied to its linspace sigmas
        unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
        torch.testing.assert_close(flow.shift_sigmas(unshifted, shift), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(flow.shift_sigmas(base, 1.0), base)
    assert (flow.shift_sigmas(base[1:], 3.0) > base[1:]).all()  # towards noise; s=1 stays 1


def test_auto_shift_grows_with_resolution():
    assert flow.auto_shift(256) == math.exp(0.5)
    assert math.isclose(flow.auto_shift(4096), math.exp(1.15))
    assert flow.auto_shift(64 * 64) > flow.auto_shift(32 * 32) > flow.auto_shift(16 * 16)


def test_sigma_samplers_stay_in_range_and_differ():
    g = torch.Generator().manual_seed(0)
    ln, un = flow.sample_sigmas(20000, g), flow.sample_sigmas(20000, g, uniform=True)
    for s in (ln, un):
        assert (s > 0).all() and (s < 1).all()
    assert abs(ln.mean() - 0.5) < 0.01 and ln.std() < un.std()  # logit-normal concentrates in the middle
