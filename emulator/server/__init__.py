"""asyncio listeners: the thin edge around the sans-IO engines."""

from .listener import Listener
from .services import LabServices

__all__ = ["Listener", "LabServices"]
