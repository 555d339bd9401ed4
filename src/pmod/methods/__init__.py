"""The routing methods, one module each: its config dataclass, its router (or none), its selection rule, its output
rule and its training loss if any. Importing this package registers them with ``pmod.core``."""

from pmod.methods.dart import DARTConfig
from pmod.methods.fastv import FastVConfig
from pmod.methods.gamma_mod import GammaMoDConfig
from pmod.methods.mod import MoDConfig
from pmod.methods.pdrop import PDropConfig
from pmod.methods.pmod import PModConfig
from pmod.methods.visionzip import VisionZipConfig

__all__ = ["DARTConfig", "FastVConfig", "GammaMoDConfig", "MoDConfig", "PDropConfig", "PModConfig", "VisionZipConfig"]
