"""The Ray layer over :mod:`trn`: thin wrappers that schedule the library on a cluster.

``workers.serve`` is the Ray Serve application (``serve run workers.serve:build_app``). Nothing under ``trn/``
imports Ray; everything Ray-specific lives here.
"""
