"""Training: the plain-PyTorch loop (:mod:`~taxonet.train.loop`), the Ray Train worker around it
(:mod:`~taxonet.train.worker`) and the driver that runs and publishes a training run (:mod:`~taxonet.train.driver`)."""
