"""Training at cluster scale: Ray Train wrapped around the plain-PyTorch loop of ``taxonet.engine``."""
