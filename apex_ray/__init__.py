"""apex-ray: APEX one-step text-to-image training, orchestrated with Ray."""

__version__ = "0.1.0"
