"""Provider simulator: a real HTTP server speaking the email provider's batch API."""

from simulator.app import ScriptedFault, Simulator, SimulatorConfig, start_simulator

__all__ = ["ScriptedFault", "Simulator", "SimulatorConfig", "start_simulator"]
