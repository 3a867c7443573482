"""Algorithm registry.

Every module in this package is imported on first lookup, so a new algorithm is one file::

    from domainbed_sil.algorithms import register_algorithm
    from domainbed_sil.algorithms.base import PenalizedAlgorithm
    from domainbed_sil.hparams import HParam

    @register_algorithm("MyAlgo")
    class MyAlgo(PenalizedAlgorithm):
        HPARAMS = {"my_knob": HParam(1.0)}
        def penalty(self, batch): ...
"""
from domainbed_sil.registry import Registry

ALGORITHMS = Registry("algorithm", __name__)
register_algorithm = ALGORITHMS.register
