"""The package version, in a module every layer may import (collect writes it into meta.json)."""

__version__ = "0.1.0"
