"""Settings: read once at start-up, passed down as frozen models."""

from config.settings import CHANNELS, PolicySettings, Settings, load_settings

__all__ = ["CHANNELS", "PolicySettings", "Settings", "load_settings"]
