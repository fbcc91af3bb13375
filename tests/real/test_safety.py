"""Safety filter and state machine: limits hold for any input, faults latch, modes are strict."""
import numpy as np
import pytest

from real.robot_spec import load_robot
from real.safety import CommandLimits, SafetyFilter
from real.state_machine import ControlStateMachine, Mode, TransitionError

SPEC = load_robot("kid_biped")
N = SPEC.n_joints
KNEE_L = SPEC.joint_names.index("knee_l")


def make_filter(**kw) -> SafetyFilter:
    return SafetyFilter(SPEC, **{"max_delta": 0.1, "max_state_age": 0.05, "soft_margin": 0.02, **kw})


def implied_torque(cmd, q, dq):
    return cmd.kp * (cmd.q_target - q) - cmd.kd * dq + cmd.tau_ff


def assert_safe(cmd, q, dq, f: SafetyFilter):
    """The guarantees that must hold for every command, whatever went in."""
    assert np.all(np.isfinite(cmd.q_target)) and np.all(np.isfinite(cmd.kp)) and np.all(np.isfinite(cmd.kd))
    assert np.all(cmd.q_target >= SPEC.q_lower) and np.all(cmd.q_target <= SPEC.q_upper)
    assert np.all(cmd.kp >= 0) and np.all(cmd.kp <= SPEC.kp)
    assert np.all(cmd.kd >= 0) and np.all(cmd.kd <= np.maximum(SPEC.kd, f.damping_kd))
    assert np.all(cmd.tau_ff == 0)
    if np.all(np.isfinite(q)) and np.all(np.isfinite(dq)):
        with np.errstate(over="ignore", invalid="ignore"):
            tau = implied_torque(cmd, q, dq)
        assert np.all(np.abs(tau) <= SPEC.tau_max * (1 + 1e-9) + 1e-9), tau


def wild(rng, x: np.ndarray) -> np.ndarray:
    """Corrupt one entry of x with NaN, +-Inf or a huge value (or leave it, half the time)."""
    x = x.copy()
    choice = rng.integers(6)
    if choice < 3:
        x[rng.integers(len(x))] = [np.nan, np.inf, -np.inf][choice]
    elif choice == 3:
        x[rng.integers(len(x))] = rng.choice([-1, 1]) * 10.0 ** rng.uniform(1, 308)
    return x


def random_state(rng):
    span = SPEC.q_upper - SPEC.q_lower
    q_des = rng.uniform(SPEC.q_lower - span, SPEC.q_upper + span)
    q = rng.uniform(SPEC.q_lower - 0.3 * span, SPEC.q_upper + 0.3 * span)
    dq = rng.uniform(-1.0, 1.0, N) * SPEC.dq_max
    if rng.random() < 0.05:
        dq[rng.integers(N)] *= 1.5   # over-speed, unless it was slow
    age = rng.choice([rng.uniform(0, 0.04), rng.uniform(0, 1.0), np.nan, np.inf, -1.0], p=[0.8, 0.1, 0.04, 0.03, 0.03])
    if rng.random() < 0.3:
        q_des, q, dq = wild(rng, q_des), wild(rng, q), wild(rng, dq)
    return q_des, q, dq, age


def test_fuzz_commands_always_inside_limits():
    rng = np.random.default_rng(0)
    f = make_filter()
    prev_target = None
    faults = clamps = 0
    for _ in range(5000):
        q_des, q, dq, age = random_state(rng)
        cmd, events = f.filter(q_des, q, dq, age)
        assert_safe(cmd, q, dq, f)
        if f.faulted:
            faults += 1
            assert np.all(cmd.kp == 0)
            f.reset()
            prev_target = None
            continue
        clamps += bool(events)
        if prev_target is not None:
            assert np.all(np.abs(cmd.q_target - prev_target) <= f.max_delta + 1e-12)
        prev_target = cmd.q_target
    assert 1000 < faults < 3000 and clamps > 1000   # both paths were exercised


def test_fuzz_state_machine_with_random_commands():
    rng = np.random.default_rng(1)
    f = make_filter()
    sm = ControlStateMachine(f, ramp_duration=0.1)
    commands = [sm.start, sm.damp, sm.estop, sm.reset]
    for _ in range(3000):
        if rng.random() < 0.05:
            try:
                commands[rng.integers(4)]()
            except TransitionError:
                pass
        q_des, q, dq, age = (random_state(rng) if rng.random() < 0.2
                             else (SPEC.q_default, SPEC.q_default, np.zeros(N), 0.0))
        cmd, _ = sm.step(q, dq, age, q_des)
        assert_safe(cmd, q, dq, f)
        if sm.mode not in (Mode.RAMP, Mode.RUNNING):
            assert np.all(cmd.kp == 0)


def test_per_tick_change_is_limited():
    f = make_filter(max_delta=0.05)
    q = SPEC.q_default.copy()
    goal = SPEC.q_default.copy()
    goal[KNEE_L] += 0.3
    targets = []
    for _ in range(8):
        cmd, events = f.filter(goal, q, np.zeros(N), 0.0)
        targets.append(cmd.q_target[KNEE_L])
    steps = np.diff([q[KNEE_L]] + targets)
    assert np.all(steps <= 0.05 + 1e-12)
    assert targets[5] == pytest.approx(goal[KNEE_L]) and targets[4] < goal[KNEE_L]
    assert not events   # arrived: nothing clamped any more


def test_default_change_limit_is_each_joints_rated_speed_for_one_tick():
    """Without max_delta a target moves at most velocity / control_hz a tick, in the joint's own
    units: 15 / 50 = 0.3 rad for the biped's knee, 0.5 / 25 = 0.02 m for the arm's gripper (a flat
    0.2 "rad" would let the gripper cross its whole 0.04 m range in one tick)."""
    for spec, joint, goal in ((SPEC, "knee_l", 2.0), (load_robot("arm7"), "gripper", 0.0)):
        f = SafetyFilter(spec)
        np.testing.assert_allclose(f.max_delta, spec.dq_max / spec.control_hz)
        j = spec.joint_names.index(joint)
        want = spec.q_default.copy()
        want[j] = goal
        path = [spec.q_default.copy()]
        for tick in range(2):   # the joint follows its target (the torque window stays out of it)
            cmd, events = f.filter(want, path[-1], np.zeros(spec.n_joints), 0.0)
            path.append(cmd.q_target)
            if tick == 0:
                assert [e.reason.split()[:3] for e in events] == [["rate", "limit:", joint]]
        steps = np.diff(path, axis=0)
        np.testing.assert_allclose(np.abs(steps[:, j]), spec.dq_max[j] / spec.control_hz)
        assert np.all(np.delete(steps, j, axis=1) == 0)
    assert path[-1][j] == 0.0   # the gripper closed in two ticks
    # one value per joint is taken as given; a value <= 0 is refused, naming the setting
    per_joint = np.full(SPEC.n_joints, 0.01)
    np.testing.assert_array_equal(SafetyFilter(SPEC, max_delta=per_joint).max_delta, per_joint)
    per_joint[KNEE_L] = 0.0
    with pytest.raises(ValueError, match="max_delta"):
        SafetyFilter(SPEC, max_delta=per_joint)


def test_position_limit_and_torque_clamp():
    f = make_filter(max_delta=10.0)
    q = SPEC.q_default.copy()
    q_des = SPEC.q_default.copy()
    q_des[KNEE_L] = 100.0
    cmd, events = f.filter(q_des, q, np.zeros(N), 0.0)
    # kp 20, tau_max 8.5: the target may lead the knee by 0.425 rad at most.
    assert cmd.q_target[KNEE_L] == pytest.approx(q[KNEE_L] + SPEC.tau_max[KNEE_L] / SPEC.kp[KNEE_L])
    reasons = [e.reason for e in events]
    assert any(r.startswith("position limit: knee_l") for r in reasons)
    assert any(r.startswith("torque limit: knee_l") for r in reasons)
    # Joint measured far outside its range: the target stays inside, the gains give way.
    q[KNEE_L] = 5.0
    cmd, events = f.filter(q_des, q, np.zeros(N), 0.0)
    assert cmd.q_target[KNEE_L] <= SPEC.q_upper[KNEE_L]
    assert abs(implied_torque(cmd, q, np.zeros(N))[KNEE_L]) == pytest.approx(SPEC.tau_max[KNEE_L])
    assert any("knee_l gains scaled" in e.reason for e in events)


@pytest.mark.parametrize("where", ["q_des", "q", "dq"])
def test_nan_goes_to_damping_and_latches_until_reset(where):
    f = make_filter()
    good = dict(q_des=SPEC.q_default, q=SPEC.q_default, dq=np.zeros(N))
    bad = dict(good, **{where: np.where(np.arange(N) == KNEE_L, np.nan, good[where])})
    cmd, events = f.filter(bad["q_des"], bad["q"], bad["dq"], 0.0)
    assert np.all(cmd.kp == 0) and np.all(cmd.kd > 0)
    assert [e.kind for e in events] == ["fault"] and "non-finite" in events[0].reason and "knee_l" in events[0].reason
    for _ in range(3):   # clean input does not clear the fault
        cmd, events = f.filter(good["q_des"], good["q"], good["dq"], 0.0)
        assert np.all(cmd.kp == 0) and events == [] and f.faulted
    f.reset()
    cmd, _ = f.filter(good["q_des"], good["q"], good["dq"], 0.0)
    assert np.all(cmd.kp == SPEC.kp) and not f.faulted


def test_wrong_shape_goes_to_damping():
    f = make_filter()
    cmd, events = f.filter(SPEC.q_default[:3], SPEC.q_default, np.zeros(N + 1), 0.0)
    assert f.faulted and np.all(cmd.kp == 0) and cmd.kd.shape == (N,)
    assert events[0].reason == "state dq has shape (11,), expected (10,)"


def test_stale_state_goes_to_damping():
    f = make_filter(max_state_age=0.02)
    cmd, events = f.filter(SPEC.q_default, SPEC.q_default, np.zeros(N), 0.019)
    assert not f.faulted
    cmd, events = f.filter(SPEC.q_default, SPEC.q_default, np.zeros(N), 0.035)
    assert f.faulted and np.all(cmd.kp == 0)
    assert events[0].reason == "stale state: age 35.0 ms > 20.0 ms"


def test_velocity_over_limit_names_the_joint():
    f = make_filter(velocity_margin=0.1)
    dq = np.zeros(N)
    dq[KNEE_L] = 16.0   # under 15 * 1.1: allowed
    f.filter(SPEC.q_default, SPEC.q_default, dq, 0.0)
    assert not f.faulted
    dq[KNEE_L] = -17.2
    cmd, events = f.filter(SPEC.q_default, SPEC.q_default, dq, 0.0)
    assert f.faulted and np.all(cmd.kp == 0)
    assert events[0].reason == "velocity limit: knee_l |dq|=17.2 > 16.5"
    # Damping torque at that speed stays within the motor limit too.
    assert np.all(np.abs(cmd.kd * dq) <= SPEC.tau_max + 1e-9)


@pytest.mark.parametrize("setting", [{"soft_margin": 1.0}, {"max_state_age": float("nan")},
                                     {"max_state_age": 0.0}, {"velocity_margin": float("nan")},
                                     {"velocity_margin": -0.1}, {"max_delta": float("inf")},
                                     {"damping_kd": -0.1}, {"damping_kd": 100.0}])
def test_bad_settings_are_refused(setting):
    """NaN included: a NaN state age limit would let a 10 s old state through, a NaN velocity
    margin any speed; a damping gain above the config's kd is one the bridge would refuse."""
    (name, _), = setting.items()
    with pytest.raises(ValueError, match=name):
        SafetyFilter(SPEC, **setting)


def test_command_limits_pass_what_the_filter_sends_and_name_what_is_outside():
    limits, f, rng = CommandLimits(SPEC), make_filter(), np.random.default_rng(0)
    q, dq = SPEC.q_default.copy(), np.zeros(N)
    for tick in range(300):   # whatever the policy wants, the filter's output (in float32 too) passes
        want = wild(rng, rng.uniform(SPEC.q_lower - 1, SPEC.q_upper + 1))
        cmd, _ = f.filter(want, q, dq, 0.0)
        assert limits.violation(*(np.float32(x) for x in cmd)) is None
        q = cmd.q_target
        if tick == 150:
            f.trip("test")   # and the damping command too
    hold = (SPEC.q_default, SPEC.kp, SPEC.kd, np.zeros(N))
    assert limits.violation(*hold) is None
    for field, value, needle in [(0, SPEC.q_upper[KNEE_L] + 3, "q_target of knee_l = 5.2 is outside [0, 2.2]"),
                                 (1, SPEC.kp[KNEE_L] * 1000, "kp of knee_l = 20000 is outside [0, 20]"),
                                 (2, -0.1, "kd of knee_l = -0.1 is outside [0, 0.6]"),
                                 (3, 500.0, "tau_ff of knee_l = 500 is outside [-8.5, 8.5]"),
                                 (3, np.nan, "tau_ff of knee_l = nan")]:
        bad = [x.copy() for x in hold]
        bad[field][KNEE_L] = value
        assert needle in limits.violation(*bad)
    assert "needs 10 values" in limits.violation(SPEC.q_default[:3], SPEC.kp, SPEC.kd, np.zeros(N))


# -- state machine -----------------------------------------------------------------------------

def make_machine(ramp_duration=0.2):
    return ControlStateMachine(make_filter(max_delta=0.2), ramp_duration=ramp_duration)


def test_idle_is_passive():
    sm = make_machine()
    cmd, events = sm.step(SPEC.q_default, np.zeros(N), 0.0, q_des=SPEC.q_upper)
    assert sm.mode is Mode.IDLE and np.all(cmd.kp == 0) and events == []


def test_ramp_reaches_default_then_runs():
    sm = make_machine(ramp_duration=0.2)   # 10 ticks at 50 Hz
    q = np.clip(SPEC.q_default + 0.3, SPEC.q_lower + 0.02, SPEC.q_upper - 0.02)
    sm.start()
    cmd, events = None, []
    for tick in range(sm.ramp_ticks):
        assert sm.mode is Mode.RAMP
        cmd, ev = sm.step(q, np.zeros(N), 0.0, q_des=SPEC.q_upper)   # policy targets ignored in RAMP
        events += ev
        q = cmd.q_target   # the robot follows
    assert sm.mode is Mode.RUNNING
    np.testing.assert_allclose(cmd.q_target, SPEC.q_default)
    assert [e.reason for e in events if e.kind == "mode"] == ["IDLE -> RAMP: start", "RAMP -> RUNNING: ramp complete"]
    q_des = SPEC.q_default + 0.05
    cmd, _ = sm.step(q, np.zeros(N), 0.0, q_des=q_des)
    np.testing.assert_allclose(cmd.q_target, np.clip(q_des, SPEC.q_lower + 0.02, SPEC.q_upper - 0.02))


def test_a_rate_limited_ramp_runs_only_once_it_has_arrived():
    """A ramp of 10 ticks from 0.3 rad away, 0.01 rad per tick: the policy starts at tick 30, on
    the default pose, not at tick 10 from wherever the rate limit had got the targets to."""
    sm = ControlStateMachine(make_filter(max_delta=0.01), ramp_duration=0.2)
    q = SPEC.q_default.copy()
    q[KNEE_L] += 0.3
    sm.start()
    ticks = 0
    while sm.mode is Mode.RAMP:
        cmd, _ = sm.step(q, np.zeros(N), 0.0)
        q, ticks = cmd.q_target, ticks + 1   # the robot follows
    assert sm.mode is Mode.RUNNING and ticks == 30
    np.testing.assert_allclose(q, SPEC.q_default, atol=1e-9)


def test_a_ramp_that_cannot_arrive_damps_naming_the_joint():
    """A knee held 0.5 rad off (blocked): its target stays within tau_max / kp = 0.425 rad of it,
    so the ramp never arrives; 2 s after the rate limit's time it is a fault, not RUNNING."""
    sm = make_machine(ramp_duration=0.2)
    q = SPEC.q_default.copy()
    q[KNEE_L] += 0.5
    sm.start()
    events, ticks = [], 0
    while sm.mode is Mode.RAMP:
        _, ev = sm.step(q, np.zeros(N), 0.0)
        events, ticks = events + ev, ticks + 1
    assert sm.mode is Mode.DAMPING and ticks == 10 + 3 + 100   # ramp + 0.5 / 0.2 rad per tick + 2 s at 50 Hz
    assert "ramp did not reach the default pose in 2.3 s: knee_l target 0.875, default 0.800" in events[-1].reason


def test_a_stop_from_the_tick_leaves_an_operators_estop_as_it_is():
    """The control tick's own stops (firmware dropped out, stale perception) may race an operator's
    e-stop from another thread: the e-stop stays, and the tick does not raise."""
    sm = make_machine()
    run_to_running(sm)
    sm.estop("operator")
    assert sm.stop_if_active("firmware reports DAMPING") is False and sm.mode is Mode.ESTOP
    sm.reset()
    run_to_running(sm)
    assert sm.stop_if_active("firmware reports IDLE") is True and sm.mode is Mode.DAMPING
    assert sm.safety.fault_reason == "firmware reports IDLE"


def run_to_running(sm):
    sm.start()
    while sm.mode is Mode.RAMP:
        sm.step(SPEC.q_default, np.zeros(N), 0.0)


def test_fault_while_running_damps_until_reset():
    sm = make_machine()
    run_to_running(sm)
    dq = np.zeros(N)
    dq[KNEE_L] = 30.0
    cmd, events = sm.step(SPEC.q_default, dq, 0.0, q_des=SPEC.q_default)
    assert sm.mode is Mode.DAMPING and np.all(cmd.kp == 0)
    assert any(e.kind == "mode" and "RUNNING -> DAMPING: velocity limit: knee_l" in e.reason for e in events)
    cmd, _ = sm.step(SPEC.q_default, np.zeros(N), 0.0, q_des=SPEC.q_default)
    assert sm.mode is Mode.DAMPING and np.all(cmd.kp == 0)
    sm.reset()
    assert sm.mode is Mode.IDLE and not sm.safety.faulted
    run_to_running(sm)
    assert sm.mode is Mode.RUNNING


def test_missing_policy_target_while_running_damps():
    sm = make_machine()
    run_to_running(sm)
    sm.step(SPEC.q_default, np.zeros(N), 0.0)
    assert sm.mode is Mode.DAMPING


def test_estop_is_latched():
    sm = make_machine()
    run_to_running(sm)
    sm.estop()
    sm.estop()   # pressing it again is fine
    for _ in range(3):
        cmd, _ = sm.step(SPEC.q_default, np.zeros(N), 0.0, q_des=SPEC.q_default)
        assert sm.mode is Mode.ESTOP and np.all(cmd.kp == 0)
    with pytest.raises(TransitionError, match="ESTOP is latched"):
        sm.damp()
    with pytest.raises(TransitionError, match="'start' refused in ESTOP"):
        sm.start()
    sm.reset()
    assert sm.mode is Mode.IDLE


@pytest.mark.parametrize("mode_setup, command, message", [
    (lambda sm: None, "reset", "'reset' refused in IDLE; allowed in DAMPING, ESTOP"),
    (lambda sm: sm.start(), "start", "'start' refused in RAMP; allowed in IDLE"),
    (run_to_running, "start", "'start' refused in RUNNING; allowed in IDLE"),
    (lambda sm: sm.damp(), "start", "'start' refused in DAMPING; allowed in IDLE"),
])
def test_illegal_transitions_are_refused(mode_setup, command, message):
    sm = make_machine()
    mode_setup(sm)
    before = sm.mode
    with pytest.raises(TransitionError) as info:
        getattr(sm, command)()
    assert str(info.value) == message and sm.mode is before


def test_damp_from_every_unlatched_mode():
    for setup in (lambda sm: None, lambda sm: sm.start(), run_to_running):
        sm = make_machine()
        setup(sm)
        sm.damp()
        cmd, events = sm.step(SPEC.q_default, np.zeros(N), 0.0, q_des=SPEC.q_default)
        assert sm.mode is Mode.DAMPING and np.all(cmd.kp == 0)
        assert events[-1].reason.endswith("-> DAMPING: damp command")
