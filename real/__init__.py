"""What runs on the robot computer: robot spec, artifact loading and checks, observation
building, safety filter and the real-time loop. Imports only numpy, torch, pyyaml and
firmware_bridge: the robot computer never needs the training stack."""
