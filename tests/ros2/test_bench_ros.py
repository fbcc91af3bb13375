"""robotrl.bench_ros smoke test: the sim-in-the-loop graph in its own ROS domain, started,
timed for 2 s at the robot's rate (50 Hz) and stopped cleanly; every figure comes back finite."""
import math

from robotrl import WALK_ARTIFACT
from robotrl.bench_ros import MAX_RESTARTS, ros_floor_stats, ros_loop_stats


def test_ros_loop_stats_smoke():
    r = ros_loop_stats(50.0, 2.0, WALK_ARTIFACT)
    for key in ("ros_latency_p50_us", "ros_latency_p99_us", "tick_wait_p99_us", "ros_latency_total_p99_us",
                "ros_lateness_p50_us", "ros_lateness_p99_us"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["ros_latency_p50_us"] <= r["ros_latency_p99_us"] <= r["ros_latency_max_us"], r
    assert math.isfinite(r["ros_mean_period_error"]) and r["ros_overruns"] >= 0, r
    assert r["ros_latency_samples"] >= 0.5 * 2.0 * 50, r   # most states' commands were paired
    assert 0 <= r["ros_restarts"] <= MAX_RESTARTS, r   # starts stopped by a watchdog are counted, not hidden


def test_ros_floor_stats_pairs_every_ping():
    """The ping-pong floor: an echo process answers pings for 1 s at 100 Hz; nearly every ping comes
    back, with round trips that are positive and ordered."""
    r = ros_floor_stats(100.0, 1.0)
    assert r["ros_floor_samples"] >= 0.8 * 100, r   # best-effort QoS on loopback: hardly any loss
    assert 0 < r["ros_floor_p50_us"] <= r["ros_floor_p99_us"] < 1e6, r
