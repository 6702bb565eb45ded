"""The one timestep policy (plan_timesteps) and its spacings, against hand-written expectations."""
import pytest

from guided_diffusion.fats import FatsState
from guided_diffusion.schedules import fast_sampled, linear
from guided_diffusion.timesteps import all_timesteps, plan_timesteps, power_timesteps, uniform_timesteps

LEARNED = {4: {"steps": [999, 400, 120, 7], "error": 0.01, "uniform_steps": [999, 666, 333, 0], "uniform_error": 0.02},
           2: {"steps": [999, 300], "error": 0.05, "uniform_steps": [999, 0], "uniform_error": 0.07}}


def test_uniform_spacing_matches_hand_computed_lists():
    # round((T - 1) * (1 - i / (K - 1))), the last step always 0
    assert uniform_timesteps(1000, 3) == [999, 500, 0]
    assert uniform_timesteps(1000, 4) == [999, 666, 333, 0]
    assert uniform_timesteps(11, 11) == list(range(10, -1, -1))
    assert uniform_timesteps(1000, 1) == [999]
    assert all_timesteps(3) == [2, 1, 0]
    with pytest.raises(ValueError, match="NFE"):
        uniform_timesteps(10, 11)


def test_power_spacing_is_denser_near_the_clean_end():
    # (T - 1) (1 - i / (K - 1))^2 for T = 101, K = 5: 100, 56.25, 25, 6.25, 0
    assert power_timesteps(101, 5, 2.0) == [100, 56, 25, 6, 0]
    assert power_timesteps(1000, 10, 1.0) == uniform_timesteps(1000, 10)


def test_plan_without_fats_state_is_every_step_or_uniform():
    schedule = linear(n_bands=1)
    assert plan_timesteps(schedule, None, None) == (list(range(999, -1, -1)), "every step (NFE=1000)")
    assert plan_timesteps(schedule, None, 0)[0] == list(range(999, -1, -1))
    assert plan_timesteps(schedule, None, 3) == ([999, 500, 0], "uniform (NFE=3)")
    sampled = fast_sampled(10, n_bands=1)  # 11 points: every step is 11 evaluations
    assert plan_timesteps(sampled, None, 0)[0] == list(range(10, -1, -1))
    with pytest.raises(ValueError, match="NFE 12 is outside 1 .. 11"):
        plan_timesteps(sampled, None, 12)


def test_plan_with_learned_timesteps_prefers_them_and_its_default_budget():
    schedule = linear(n_bands=1)
    state = FatsState().with_learned(LEARNED, default_nfe=4)
    assert plan_timesteps(schedule, state, None) == ([999, 400, 120, 7], "learned (NFE=4)")
    assert plan_timesteps(schedule, state, 2) == ([999, 300], "learned (NFE=2)")
    assert plan_timesteps(schedule, state, 3) == ([999, 500, 0], "uniform (NFE=3)")  # not learned: uniform
    # a default budget whose steps were never learned (a FATS run before fitting): every step
    early = FatsState(band_shifts=(0.0,) * 8, default_nfe=4)
    assert plan_timesteps(schedule, early, 0)[0] == list(range(999, -1, -1))


def test_plan_reads_a_version_1_checkpoint_state():
    old = {"version": 1, "energy_stats": None, "band_shifts": None, "kappa": None, "extra": {},
           "timesteps": {"2": {"steps": [999, 300], "error": 0.05, "uniform_steps": [999, 0], "uniform_error": 0.07}},
           "default_k": 2}
    state = FatsState.from_extra({"fats": old})
    assert plan_timesteps(linear(n_bands=1), state, 0) == ([999, 300], "learned (NFE=2)")
