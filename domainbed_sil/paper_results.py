"""The paper's published numbers (PROTOCOL.md section 4), as data.

Accuracies are in percent.  A :class:`PaperValue` is a mean and, where the paper gives one,
a standard deviation (population std over its runs).  Nothing here is computed: these are
the targets printed beside the collector's own cells.

Row names are the table rows of the collector: an algorithm's registry name (``ERM``,
``IRM``, ``VREx``, ``SIL``), or one of the special rows below.  The paper prints "V-REx";
the collector shows the row under the registry name so that a sweep's runs and the paper's
line meet in one row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

GRAYSCALE_ORACLE = "Grayscale oracle"
HYPOTHETICAL_OPTIMUM = "Hypothetical optimum"
ADVERSARIAL = "Adversarial target-invariance"
JIGSAW = "Jigsaw"


@dataclass(frozen=True)
class PaperValue:
    """One published number in percent; ``std`` is None where the paper gives none."""

    mean: float
    std: Optional[float] = None


def _v(mean: float, std: Optional[float] = None) -> PaperValue:
    return PaperValue(mean, std)


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's tables.

    ``columns``: the paper's column labels, in its order (for Tables 3-4 the test domains
    then ``Avg``; for Tables 1-2 ``Train`` and ``Test``).  ``env_of_column``: for per-domain
    tables, the dataset's environment index behind each domain column (DomainBed's env order);
    empty for Tables 1-2.  ``rows``: row name -> column label -> value.  ``reference_rows``:
    rows reported by the paper from other work that no sweep here reproduces.
    ``constant_rows``: rows that are a constant, not an experiment (the hypothetical optimum).
    """

    key: str
    title: str
    dataset: str
    columns: Tuple[str, ...]
    rows: Mapping[str, Mapping[str, PaperValue]]
    env_of_column: Mapping[str, int] = field(default_factory=dict)
    reference_rows: Tuple[str, ...] = ()
    constant_rows: Tuple[str, ...] = ()
    test_env: Optional[int] = None  # Tables 1-2: the one test environment
    decimals: int = 1

    def row_order(self) -> List[str]:
        return list(self.rows)


def _train_test(train: PaperValue, test: PaperValue) -> Dict[str, PaperValue]:
    return {"Train": train, "Test": test}


def _domains(columns: Tuple[str, ...], values: Tuple[PaperValue, ...]) -> Dict[str, PaperValue]:
    assert len(columns) == len(values), (columns, values)
    return dict(zip(columns, values))


TABLE1 = PaperTable(
    key="table1",
    title="Table 1: Colored MNIST (25% label flipping), train / test accuracy",
    dataset="ColoredMNIST",
    columns=("Train", "Test"),
    rows={
        "SIL": _train_test(_v(69.6, 1.3), _v(70.4, 1.8)),
        "VREx": _train_test(_v(71.5, 1.0), _v(68.7, 0.9)),
        "IRM": _train_test(_v(70.8, 0.9), _v(66.9, 2.5)),
        "ERM": _train_test(_v(87.4, 0.2), _v(17.1, 0.6)),
        HYPOTHETICAL_OPTIMUM: _train_test(_v(75.0), _v(75.0)),
        GRAYSCALE_ORACLE: _train_test(_v(73.5, 0.2), _v(73.0, 0.4)),
    },
    constant_rows=(HYPOTHETICAL_OPTIMUM,),
    test_env=2,
    decimals=1,
)

TABLE2 = PaperTable(
    key="table2",
    title="Table 2: Colored MNIST without label flipping, train / test accuracy",
    dataset="ColoredMNISTNoFlip",
    columns=("Train", "Test"),
    rows={
        "SIL": _train_test(_v(96.0, 0.3), _v(96.5, 0.3)),
        "VREx": _train_test(_v(97.6, 0.3), _v(95.5, 0.8)),
        "ERM": _train_test(_v(99.3, 0.1), _v(92.5, 0.6)),
        "IRM": _train_test(_v(97.1, 0.1), _v(83.6, 0.8)),
        HYPOTHETICAL_OPTIMUM: _train_test(_v(100.0), _v(100.0)),
        GRAYSCALE_ORACLE: _train_test(_v(98.7, 0.1), _v(97.7, 0.1)),
    },
    constant_rows=(HYPOTHETICAL_OPTIMUM,),
    test_env=2,
    decimals=1,
)

_VLCS_COLUMNS = ("Caltech", "SUN", "Pascal", "LabelMe", "Avg")
TABLE3 = PaperTable(
    key="table3",
    title="Table 3: VLCS, test accuracy per held-out domain",
    dataset="VLCS",
    columns=_VLCS_COLUMNS,
    # DomainBed's VLCS order: 0 Caltech101, 1 LabelMe, 2 SUN09, 3 VOC2007 (Pascal)
    env_of_column={"Caltech": 0, "SUN": 2, "Pascal": 3, "LabelMe": 1},
    rows={
        "SIL": _domains(_VLCS_COLUMNS, (_v(96.89, 0.31), _v(65.52, 0.83), _v(72.11, 0.63), _v(61.66, 0.59), _v(74.04))),
        "VREx": _domains(_VLCS_COLUMNS, (_v(96.72), _v(63.68), _v(72.41), _v(60.40), _v(73.30))),
        "IRM": _domains(_VLCS_COLUMNS, (_v(95.99), _v(62.85), _v(71.71), _v(59.61), _v(72.54))),
        "ERM": _domains(_VLCS_COLUMNS, (_v(94.76), _v(61.92), _v(69.03), _v(60.55), _v(71.56))),
        ADVERSARIAL: _domains(_VLCS_COLUMNS, (_v(95.92), _v(69.37), _v(71.14), _v(67.63), _v(75.92))),
        JIGSAW: _domains(_VLCS_COLUMNS, (_v(96.93), _v(64.30), _v(70.62), _v(60.19), _v(73.19))),
    },
    reference_rows=(ADVERSARIAL, JIGSAW),
    decimals=2,
)

_PACS_COLUMNS = ("Art painting", "Cartoon", "Sketch", "Photo", "Avg")
TABLE4 = PaperTable(
    key="table4",
    title="Table 4: PACS, test accuracy per held-out domain",
    dataset="PACS",
    columns=_PACS_COLUMNS,
    # DomainBed's PACS order: 0 art_painting, 1 cartoon, 2 photo, 3 sketch
    env_of_column={"Art painting": 0, "Cartoon": 1, "Sketch": 3, "Photo": 2},
    rows={
        "SIL": _domains(_PACS_COLUMNS, (_v(69.62, 0.47), _v(71.41, 1.35), _v(63.10, 1.19), _v(89.96, 0.47), _v(73.52))),
        "VREx": _domains(_PACS_COLUMNS, (_v(67.04), _v(67.97), _v(59.81), _v(89.74), _v(71.14))),
        "IRM": _domains(_PACS_COLUMNS, (_v(67.05), _v(68.49), _v(57.81), _v(89.39), _v(70.69))),
        "ERM": _domains(_PACS_COLUMNS, (_v(66.22), _v(67.59), _v(57.90), _v(89.64), _v(70.35))),
        ADVERSARIAL: _domains(_PACS_COLUMNS, (_v(66.60), _v(73.36), _v(68.03), _v(88.12), _v(74.02))),
        JIGSAW: _domains(_PACS_COLUMNS, (_v(67.63), _v(71.71), _v(65.18), _v(89.00), _v(73.38))),
    },
    reference_rows=(ADVERSARIAL, JIGSAW),
    decimals=2,
)

PAPER_TABLES: Tuple[PaperTable, ...] = (TABLE1, TABLE2, TABLE3, TABLE4)
# Tables 1-2 follow the Arjovsky protocol (final step); Tables 3-4 the JiGen one (best source validation).
DEFAULT_SELECTION: Mapping[str, str] = {"table1": "final_step", "table2": "final_step",
                                        "table3": "training_domain", "table4": "training_domain"}


def paper_table_for(dataset: str) -> Optional[PaperTable]:
    """The paper's table whose experiments use ``dataset``, or None."""
    for table in PAPER_TABLES:
        if table.dataset == dataset:
            return table
    return None
