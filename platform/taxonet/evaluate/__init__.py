"""Evaluation of a trained checkpoint: :mod:`~taxonet.evaluate.run` runs it over a prepared dataset's split,
:mod:`~taxonet.evaluate.report` builds the report from its outputs (pure), :mod:`~taxonet.evaluate.render` writes
the report as Markdown, CSV, JSON and plots."""
