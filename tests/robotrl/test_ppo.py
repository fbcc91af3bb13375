import numpy as np
import pytest
import torch

from robotrl.algos.ppo import PPO, PPOConfig, NonFiniteError, gae


class PointReach:
    """A 2-D point must move to a goal: obs (pos, goal), action = velocity. Small enough to learn
    in seconds, hard enough that a random policy scores far worse."""

    def __init__(self, n, rng):
        self.n, self.rng = n, rng
        self.pos = np.zeros((n, 2))
        self.goal = np.zeros((n, 2))
        self.t = np.zeros(n, dtype=int)
        self.reset(np.arange(n))

    def reset(self, ids):
        self.pos[ids] = self.rng.uniform(-1, 1, (len(ids), 2))
        self.goal[ids] = self.rng.uniform(-1, 1, (len(ids), 2))
        self.t[ids] = 0

    def obs(self):
        return np.concatenate([self.pos, self.goal], 1).astype(np.float32)

    def step(self, a):
        self.pos += 0.1 * np.clip(a, -1, 1)
        self.t += 1
        reward = -np.linalg.norm(self.pos - self.goal, axis=1)
        done = self.t >= 20
        return reward, done


def run_policy(algo, env, steps, learn):
    total = []
    for it in range(steps):
        ep_reward = np.zeros(env.n)
        for _ in range(algo.cfg.steps_per_env):
            obs = torch.as_tensor(env.obs())
            a = algo.act(obs, obs).numpy() if learn else algo.model.action_mean(obs).detach().numpy()
            r, done = env.step(a)
            ep_reward += r
            if learn:
                algo.record(torch.as_tensor(r, dtype=torch.float32), torch.as_tensor(done),
                            torch.zeros(env.n, dtype=torch.bool), torch.zeros(env.n), {})
            env.reset(np.flatnonzero(done))
        if learn:
            obs = torch.as_tensor(env.obs())
            algo.update(obs, progress=it / steps, step=it)
        total.append(ep_reward.mean())
    return float(np.mean(total[-3:]))


def test_ppo_learns_point_reach():
    torch.manual_seed(0)
    cfg = PPOConfig(steps_per_env=20, epochs=5, minibatches=4, actor_hidden=[64, 64], critic_hidden=[64, 64],
                    lr=3e-3, init_std=0.6, entropy_coef=0.0)
    env = PointReach(32, np.random.default_rng(0))
    algo = PPO(4, 4, 2, cfg, num_envs=32)
    untrained = run_policy(algo, env, 3, learn=False)
    algo.buffer.t = 0
    run_policy(algo, env, 60, learn=True)
    trained = run_policy(algo, env, 3, learn=False)
    # An untrained policy wanders (about -15 per 20-step episode); a learned one heads to the goal.
    assert trained > untrained + 5.0, (untrained, trained)
    assert trained > -9.0


def test_gae_matches_hand_computation():
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [1.0], [1.5]])
    d = torch.tensor([[0.0], [1.0], [0.0]])
    last = torch.tensor([2.0])
    g, lam = 0.9, 0.8
    adv, ret = gae(r, v, d, last, g, lam)
    d2 = 3.0 + g * 2.0 - 1.5
    d1 = 2.0 - 1.0                     # episode ended: no bootstrap
    d0 = 1.0 + g * 1.0 - 0.5
    a1 = d1
    a0 = d0 + g * lam * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, d2]))
    torch.testing.assert_close(ret, adv + v)


def test_nan_reward_is_reported_with_step():
    cfg = PPOConfig(steps_per_env=2, actor_hidden=[8], critic_hidden=[8])
    algo = PPO(3, 3, 1, cfg, num_envs=2)
    for _ in range(2):
        algo.act(torch.zeros(2, 3), torch.zeros(2, 3))
        algo.record(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.bool),
                    torch.zeros(2, dtype=torch.bool),
                    torch.zeros(2), {})
    with pytest.raises(NonFiniteError, match="rewards at env step 1234"):
        algo.update(torch.zeros(2, 3), progress=0.0, step=1234)


@pytest.mark.parametrize("kw, key", [({"lr_schedule": "cosine"}, "lr_schedule"), ({"gamma": 1.5}, "gamma"),
                                     ({"epochs": 0}, "epochs")])
def test_bad_algo_values_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        PPOConfig(**kw)
