"""taxonet: hierarchical insect classification (order → family → species) trained with Ray Train, served with Ray Serve.

Implements Bjerge et al. 2023 (multitask CNNs, taxonomy-aware loss, anomaly detection per rank). Importing this
package does nothing but define the version: heavy modules (torch, ray) are imported where they are used.
"""

__version__ = "0.1.0"
