"""Serving and dataset generation on Ray (extra ``semvoc[serve]``): ``server`` is ``semvoc-serve``
(Ray Serve over HTTP), ``offline`` runs ``semvoc-run --prompts ... --ray`` on Ray Data. Nothing in
``semvoc.runtime`` imports this package unless ``--ray`` is given."""
