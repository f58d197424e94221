"""The rank governor: sensors -> policies -> a rank on a running model, and a device simulator.
Torch-free, like all of ``deploy/``."""

from .config import PolicyConfig, load_policy, policy_from_dict
from .loop import Decision, Governor
from .policy import Ceiling, Levels
from .sensors import Readings, SysfsSensors

__all__ = ["Governor", "Decision", "PolicyConfig", "load_policy", "policy_from_dict", "Ceiling", "Levels",
           "Readings", "SysfsSensors"]
