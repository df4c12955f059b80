import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast.envs import goal_variants, make_env, scripted_policy


@pytest.mark.parametrize("task", hf.TASK_SETS["MT50"])
def test_every_mt50_task_has_env_and_policy(task):
    assert scripted_policy(task) is not None
    assert len(goal_variants(task)) >= 10


def test_scripted_reach_succeeds():
    env = make_env("reach-v3", goal_index=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (39,)
    policy = scripted_policy("reach-v3")
    success = False
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(np.clip(policy.get_action(obs), -1, 1))
        success |= bool(info["success"])
        if success or terminated or truncated:
            break
    assert success
