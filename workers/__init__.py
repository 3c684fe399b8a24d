"""The Ray layer over :mod:`trn`: thin wrappers that schedule the library on a cluster.

``trn_workers.serve`` is the Ray Serve application (``serve run trn_workers.serve:build_app``). Nothing under ``trn/``
imports Ray; everything Ray-specific lives here.
"""
