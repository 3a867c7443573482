"""Dataset registry.  ``DATASETS.get(name)`` returns the class; modules here self-register."""
from domainbed_sil.registry import Registry

DATASETS = Registry("dataset", __name__)
register_dataset = DATASETS.register
