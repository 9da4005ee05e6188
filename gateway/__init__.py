"""Entitlement-enforcing sidecar gateway for the courier-dispatch APIs.

The pure core (``routes``, ``matrix``, ``license``, ``decision``) knows nothing of HTTP;
``config`` loads and cross-checks the three TOML files; ``cli`` is the operator's door.
"""

__version__ = "0.2.0"
