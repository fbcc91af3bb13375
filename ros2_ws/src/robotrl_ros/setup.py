"""ament_python package: `colcon build` on a robot, or `pip install -e ros2_ws/src/robotrl_ros`
into the venv (what `robotrl deploy` and the tests use)."""
from pathlib import Path

from setuptools import setup

PACKAGE = "robotrl_ros"
HERE = Path(__file__).resolve().parent
# The launch files live once, in the repository's launch/ folder; installed into share/ so that
# `ros2 launch robotrl_ros sim.launch.yaml` finds them (relative paths: setuptools wants them).
LAUNCH = sorted(f"../../../launch/{p.name}" for p in (HERE.parents[2] / "launch").glob("*.launch.yaml"))

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[PACKAGE],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", LAUNCH),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="robotrl maintainers",
    maintainer_email="robotrl@example.com",
    description="rclpy nodes for robotrl: policy, firmware bridge, emulated firmware",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            f"policy_node = {PACKAGE}.policy_node:main",
            f"bridge_node = {PACKAGE}.bridge_node:main",
            f"firmware_node = {PACKAGE}.firmware_node:main",
            f"recorder_node = {PACKAGE}.recorder_node:main",
        ],
    },
)
