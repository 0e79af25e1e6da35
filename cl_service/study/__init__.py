"""Studies: one CL configuration run over several task orders and seeds, with intervals and paired tests.

A study is the grid of (order, seed) cells, each a CL run (:func:`cl_service.run.run_stream` with ``data.order``
and ``seed`` set), sharing every training job whose key repeats across cells through the adapter cache of
:mod:`cl_service.sweep.cache`. Plain library code (no Ray): :mod:`.orders` picks the orders, :mod:`.plan` lays
out the cells and counts the jobs they share, :mod:`.cell` runs one cell, :mod:`.stats` holds the interval and
test code, :mod:`.items` reads per-item scores and routes back from a run's prediction files, :mod:`.analysis`
builds ``study.json`` and :mod:`.report` writes ``report.md`` and the plots. The Ray driver is
:mod:`cl_service.on_ray.study`.
"""
