"""Statistics collection: forward hooks + tensor hooks, reduced on device, one transfer per step."""

from normscope.collect.scope import DEFAULT_EVERY, Scope, watch

__all__ = ["DEFAULT_EVERY", "Scope", "watch"]
