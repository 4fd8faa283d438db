"""compress: an edge-deployment compression toolchain for causal language models.

Importing this package is cheap (no torch): heavy modules are imported by the
functions that need them.
"""

__version__ = "0.1.0"
