"""A sweep, from its spec to the list of jobs it runs.  Pure: no files read, no processes.

A *job* is one call of ``domainbed_sil.train.main(argv)``.  Its identity is the hash of the
arguments that define the run (:data:`DEFINING_KEYS`); the data path, the output path and
the launcher are not among them, so moving the data or switching launcher finds the same
job directories.

A *spec* is a mapping (the JSON of ``sweeps/NAME.json``)::

    {"datasets": ["ColoredMNIST"],          # top-level settings apply to every row
     "n_trials": 10,
     "rows": [                              # optional; default: one row per "algorithms" entry
        {"algorithm": "SIL", "steps": 1500},
        {"name": "oracle", "algorithm": "ERM", "steps": 101,
         "hparams": {"grayscale_model": true}}]}

Settings are resolved per row as: built-in defaults < spec top level < row < command line,
except ``hparams``, which is merged key by key in the same order.  See docs/sweeps.md.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.datasets import DATASETS
from domainbed_sil.hparams import apply_overrides, default_hparams, seed_hash

# The train arguments that define a run: they name its directory.
DEFINING_KEYS = (
    "dataset", "algorithm", "test_envs", "hparams", "hparams_seed", "trial_seed", "seed",
    "steps", "holdout_fraction", "checkpoint_freq",
)

# Settings a row (or the spec's top level, or the command line) may give, with their defaults.
ROW_DEFAULTS: Dict[str, Any] = {
    "datasets": None,         # required somewhere
    "test_envs": None,        # None: each dataset's default test envs; "all": every single env
    "n_hparams": 1,           # hparams seeds 0..n_hparams-1 (0 = the defaults)
    "n_trials": 1,            # trial seeds 0..n_trials-1
    "steps": None,            # None: the dataset's default
    "checkpoint_freq": None,  # None: the dataset's default
    "holdout_fraction": None,  # None: the dataset's default
    "hparams": None,          # overrides, merged key by key
}
ROW_ONLY_KEYS = ("name", "algorithm")
SPEC_ONLY_KEYS = ("algorithms", "rows", "description")


class SpecError(ValueError):
    """A sweep spec or command-line setting that cannot be expanded; the message is one line."""


@dataclass(frozen=True)
class Job:
    """One training run.  ``None`` for steps / checkpoint_freq / holdout_fraction = train's default."""

    dataset: str
    algorithm: str
    test_envs: Tuple[int, ...]
    hparams_json: Optional[str]  # canonical JSON of the overrides, or None
    hparams_seed: int
    trial_seed: int
    seed: int
    steps: Optional[int]
    holdout_fraction: Optional[float]
    checkpoint_freq: Optional[int]
    name: str = ""  # the spec row's label (not part of the identity)

    @property
    def hparams(self) -> Optional[Dict[str, Any]]:
        return None if self.hparams_json is None else json.loads(self.hparams_json)

    def defining_args(self) -> Dict[str, Any]:
        args = {key: getattr(self, key) for key in DEFINING_KEYS if key != "hparams"}
        args["test_envs"] = list(self.test_envs)
        args["hparams"] = self.hparams
        return args

    @property
    def job_id(self) -> str:
        """16 hex digits of the md5 of the defining arguments (canonical JSON)."""
        text = json.dumps(self.defining_args(), sort_keys=True)
        return hashlib.md5(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        """A short human description, e.g. ``oracle(ERM) ColoredMNIST te=[2] hp=0 trial=3 steps=101``."""
        who = self.algorithm if self.name in ("", self.algorithm) else f"{self.name}({self.algorithm})"
        steps = "default" if self.steps is None else self.steps
        return (f"{who} {self.dataset} te={list(self.test_envs)} hp={self.hparams_seed} "
                f"trial={self.trial_seed} steps={steps}")

    def train_argv(self, output_dir: str, data_dir: Optional[str] = None, threads: Optional[int] = None,
                   skip_model_save: bool = False) -> List[str]:
        """Arguments for ``domainbed_sil.train.main``; ``output_dir`` is this job's own directory."""
        argv = ["--dataset", self.dataset, "--algorithm", self.algorithm,
                "--test_envs", *map(str, self.test_envs),
                "--hparams_seed", str(self.hparams_seed), "--trial_seed", str(self.trial_seed),
                "--seed", str(self.seed), "--output_dir", str(output_dir)]
        if self.hparams_json is not None:
            argv += ["--hparams", self.hparams_json]
        for key in ("steps", "holdout_fraction", "checkpoint_freq"):
            if getattr(self, key) is not None:
                argv += [f"--{key}", str(getattr(self, key))]
        if data_dir is not None:
            argv += ["--data_dir", str(data_dir)]
        if threads is not None:
            argv += ["--threads", str(threads)]
        if skip_model_save:
            argv.append("--skip_model_save")
        return argv


def derive_seed(dataset: str, algorithm: str, test_envs: Sequence[int], hparams: Optional[Mapping[str, Any]],
                hparams_seed: int, trial_seed: int) -> int:
    """The job's ``--seed`` (initialisation and batches): a hash of everything but the run length.

    Steps, checkpoint frequency and holdout are left out so that a shorter run of the same
    configuration starts identically (its records are a prefix of the longer run's).
    """
    return seed_hash("seed", dataset, algorithm, list(test_envs), dict(hparams or {}), hparams_seed, trial_seed)


def parse_test_envs_cli(values: Optional[Sequence[str]]) -> Any:
    """``--test_envs`` words -> spec value: ``["0", "1,2"]`` -> ``[[0], [1, 2]]``; ``["all"]`` -> ``"all"``."""
    if not values:
        return None
    if list(values) == ["all"]:
        return "all"
    sets = []
    for word in values:
        try:
            sets.append([int(part) for part in word.split(",")])
        except ValueError:
            raise SpecError(f"--test_envs expects 'all' or sets of env indices like '2' or '0,1', got {word!r}")
    return sets


def load_spec(text: str, source: str) -> Dict[str, Any]:
    """Parse a spec's JSON text; ``source`` names it in error messages."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{source}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})")
    if not isinstance(spec, dict):
        raise SpecError(f"{source}: expected a JSON object with 'rows' or 'algorithms', got {type(spec).__name__}")
    return spec


def expand(spec: Mapping[str, Any], cli: Optional[Mapping[str, Any]] = None) -> List[Job]:
    """All jobs of a sweep, deterministic order, duplicates (same job id) dropped.

    ``cli`` holds command-line settings (keys of :data:`ROW_DEFAULTS`, plus ``algorithms``,
    which selects rows by name or algorithm); a ``None`` value means "not given".
    Order: rows, then datasets, test env sets, hparams seeds, trial seeds.
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    _check_keys(spec, set(ROW_DEFAULTS) | set(SPEC_ONLY_KEYS), "the sweep spec")
    rows = _rows(spec, cli.pop("algorithms", None))
    jobs: Dict[str, Job] = {}
    for index, row in enumerate(rows):
        _check_keys(row, set(ROW_DEFAULTS) | set(ROW_ONLY_KEYS), f"row {index}")
        settings = {**ROW_DEFAULTS, **{k: v for k, v in spec.items() if k in ROW_DEFAULTS}, **row, **cli}
        settings["hparams"] = {**(spec.get("hparams") or {}), **(row.get("hparams") or {}), **(cli.get("hparams") or {})}
        label = row.get("name") or row.get("algorithm")
        for job in _row_jobs(row, settings, f"row {index}" + (f" ({label})" if label else "")):
            jobs.setdefault(job.job_id, job)
    return list(jobs.values())


def _rows(spec: Mapping[str, Any], selected: Optional[Sequence[str]]) -> List[Mapping[str, Any]]:
    if "rows" in spec:
        rows = spec["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SpecError("'rows' must be a list of objects like {\"algorithm\": \"ERM\", \"steps\": 501}")
        if selected:
            unknown = [s for s in selected if not any(s in (r.get("name"), r.get("algorithm")) for r in rows)]
            if unknown:
                names = sorted({str(r.get("name") or r.get("algorithm")) for r in rows})
                raise SpecError(f"--algorithms {unknown[0]!r} matches no row of the spec; rows: {', '.join(names)}")
            rows = [r for r in rows if r.get("name") in selected or r.get("algorithm") in selected]
        return rows
    algorithms = selected or spec.get("algorithms")
    if not algorithms:
        raise SpecError("no algorithms: pass --algorithms NAME ... or give 'algorithms' or 'rows' in the spec")
    if isinstance(algorithms, str) or not isinstance(algorithms, list):
        raise SpecError(f"'algorithms' must be a list of names, got {algorithms!r}")
    return [{"algorithm": name} for name in algorithms]


def _check_keys(mapping: Mapping[str, Any], allowed: set, where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")


def _positive_int(value: Any, name: str, where: str, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{where}: '{name}' must be a positive integer, got {value!r}")
    return value


def _row_jobs(row: Mapping[str, Any], s: Mapping[str, Any], where: str) -> List[Job]:
    if "algorithm" not in row:
        raise SpecError(f"{where}: missing 'algorithm'; a row looks like {{\"algorithm\": \"ERM\", \"steps\": 501}}")
    try:
        algorithm_class = ALGORITHMS.get(row.get("algorithm"))
    except ValueError as err:
        raise SpecError(f"{where}: {err}")
    datasets = s["datasets"]
    if not datasets:
        raise SpecError(f"{where}: no datasets; pass --datasets NAME ... or give 'datasets' in the spec")
    if isinstance(datasets, str) or not isinstance(datasets, list):
        raise SpecError(f"{where}: 'datasets' must be a list of names, got {datasets!r}")
    n_hparams = _positive_int(s["n_hparams"], "n_hparams", where, allow_none=False)
    n_trials = _positive_int(s["n_trials"], "n_trials", where, allow_none=False)
    steps = _positive_int(s["steps"], "steps", where)
    freq = _positive_int(s["checkpoint_freq"], "checkpoint_freq", where)
    holdout = s["holdout_fraction"]
    if holdout is not None and (not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0 <= holdout < 1):
        raise SpecError(f"{where}: 'holdout_fraction' must be a number in [0, 1), got {holdout!r}")
    overrides = s["hparams"]
    if not isinstance(overrides, dict):
        raise SpecError(f"{where}: 'hparams' must be an object like {{\"lr\": 0.001}}, got {overrides!r}")
    jobs = []
    for dataset_name in datasets:
        try:
            dataset_class = DATASETS.get(dataset_name)
            apply_overrides(default_hparams(algorithm_class, dataset_class), overrides)  # names and types
        except ValueError as err:
            raise SpecError(f"{where}: {err}")
        hparams_json = json.dumps(overrides, sort_keys=True) if overrides else None
        # jobs that differ only in how a number is computed start from the same seed: comparable
        seeded_overrides = {k: v for k, v in overrides.items() if k not in algorithm_class.IMPLEMENTATION_HPARAMS}
        for test_envs in _test_env_sets(s["test_envs"], dataset_class, where):
            for hparams_seed in range(n_hparams):
                for trial_seed in range(n_trials):
                    seed = derive_seed(dataset_name, row["algorithm"], test_envs, seeded_overrides, hparams_seed, trial_seed)
                    jobs.append(Job(dataset_name, row["algorithm"], tuple(test_envs), hparams_json, hparams_seed,
                                    trial_seed, seed, steps, None if holdout is None else float(holdout), freq,
                                    name=str(row.get("name") or row["algorithm"])))
    return jobs


def _test_env_sets(value: Any, dataset_class: type, where: str) -> List[List[int]]:
    if value is None:
        return [list(dataset_class.DEFAULT_TEST_ENVS)]
    if value == "all":
        return [[i] for i in range(len(dataset_class.ENVIRONMENTS))]
    if not isinstance(value, list) or not all(
        isinstance(s, list) and s and all(isinstance(i, int) and not isinstance(i, bool) for i in s) for s in value
    ):
        raise SpecError(f"{where}: 'test_envs' must be null, \"all\" or a list of sets like [[2]] or [[0], [1, 2]], got {value!r}")
    try:
        for envs in value:
            dataset_class.check_test_envs(envs)
    except ValueError as err:
        raise SpecError(f"{where}: {err}")
    return [list(envs) for envs in value]


def array_chunks(items: Sequence[Any], max_size: int) -> List[List[Any]]:
    """``items`` cut into consecutive lists of at most ``max_size`` (a cluster's MaxArraySize)."""
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    return [list(items[i : i + max_size]) for i in range(0, len(items), max_size)]
