"""The run configuration: one frozen `RunConfig`, built once from the options a user gave (or
from a run's `run.json` on `--resume`), one default per option.

`Settings` is the part that decides a region (one radius and one step); `RunConfig.settings`
builds it. `RunConfig.stored()` is what `run.json` and every run store hold: the options that
change a decision. Output options (`OUTPUT_OPTIONS`) may differ on `--resume`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from verifier.engine.regions import FAMILIES
from verifier.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEFAULT_MODEL = EXAMPLES / "mnist_mlp.onnx"
# The README's main command runs the embedded default on this many inputs unless told otherwise.
DEFAULT_EXAMPLE_LIMIT = 100
SEARCHES = ("exact", "mcts")
DEFAULT_MODES = ("dynamic", "ort-qdq")
# Options that may differ on --resume: they change no decision.
OUTPUT_OPTIONS = (
    "out",
    "resume",
    "workers",
    "cluster",
    "quiet",
    "json",
    "examples",
    "min_relative_robustness",
    "max_transfer",
    "max_unknown",
    "min_accuracy",
    "baseline",
    "tolerance",
)
GATE_OPTIONS = ("min_relative_robustness", "max_transfer", "max_unknown", "min_accuracy")


@dataclass(frozen=True)
class Settings:
    """How regions are built and decided for one (radius, step); part of the run configuration."""

    radius: float = 20.0
    step: float = 0.25
    region: str = "features"  # a key of regions.FAMILIES
    dims: int = 10  # lattice: how many values move
    feature_dims: int = 10  # features: values per feature
    selection: str = "activation"  # features.SELECTIONS
    search: str = "exact"  # SEARCHES
    timeout: float = 2.0  # seconds per input and model (quantized ones: `quantized_budget`)
    # seconds per input and quantized model (None: `timeout`): a quantized copy's rounding
    # makes its hard inputs cost more than the float model's (`quantized_budget`)
    quantized_timeout: float | None = None
    max_nodes: int = 20000
    # regions and branch-and-bound leaves with at most this many points are enumerated on the
    # runtime, and a leaf's sieve runs at most this many (`bab.SIEVE_POINTS`); a quantized
    # model's bounds are looser, so enumerating pays sooner
    enum_limit: int = 4096
    quantized_enum_limit: int = 8192
    rollouts: int = 2000  # mcts
    use_smt: bool = True
    seed: int = 0

    @property
    def quantized_budget(self) -> float:
        """Seconds a quantized model's decision of one input may take."""
        return self.timeout if self.quantized_timeout is None else self.quantized_timeout


def stored_quantized_budget(options: dict) -> float | None:
    """`Settings.quantized_budget` of stored options (run.json, a run store's configuration, a
    results document's settings); None when they hold no timeout."""
    timeout = options.get("quantized_timeout")
    return options.get("timeout") if timeout is None else timeout


@dataclass(frozen=True)
class RunConfig:
    """Every option of the main job (see `verify --help`); the decision options first."""

    model: Path | None = None  # None: the embedded DEFAULT_MODEL
    layout: str | None = None  # None: read from the graph
    data: str | None = None  # None: guessed from the model's input size
    data_dir: Path | None = None
    limit: int | None = None
    indices: str | None = None
    labels: str | None = None
    radius: tuple[float, ...] = (Settings.radius,)
    step: tuple[float, ...] = (Settings.step,)
    region: str = Settings.region
    dims: int = Settings.dims
    feature_dims: int = Settings.feature_dims
    selection: str = Settings.selection
    search: str = Settings.search
    timeout: float = Settings.timeout
    quantized_timeout: float | None = Settings.quantized_timeout
    max_nodes: int = Settings.max_nodes
    enum_limit: int = Settings.enum_limit
    quantized_enum_limit: int = Settings.quantized_enum_limit
    rollouts: int = Settings.rollouts
    use_smt: bool = Settings.use_smt
    quantized: tuple[Path, ...] = ()
    modes: str | None = None  # None: DEFAULT_MODES when no --quantized file is given
    calib_size: int = 500
    calib_data: str | None = None
    seed: int = Settings.seed
    # output and gate options
    out: Path | None = None
    resume: Path | None = None
    workers: int = 1
    cluster: str | None = None  # a Dask scheduler's address: run the checks there
    quiet: bool = False
    json: bool = False
    examples: int = 12
    min_relative_robustness: float | None = None
    max_transfer: float | None = None
    max_unknown: float | None = None
    min_accuracy: float | None = None
    baseline: Path | None = None
    tolerance: float = 0.0

    @property
    def model_path(self) -> Path:
        """The model file: `--model`, else the embedded default."""
        return self.model or DEFAULT_MODEL

    def settings(self, radius: float, step: float) -> Settings:
        """The decision settings of one (radius, step) of the sweep."""
        names = {f.name for f in fields(Settings)} - {"radius", "step"}
        return Settings(radius, step, **{n: getattr(self, n) for n in names})

    def sweep(self) -> list[Settings]:
        """One `Settings` per (radius, step), radii outermost."""
        return [self.settings(r, s) for r in self.radius for s in self.step]

    def mode_options(self) -> list[tuple[str, dict]]:
        """`--modes` as (mode, options) pairs, each checked against the mode's table (empty
        when not given: which modes a run builds by default depends on its data)."""
        from quantize.modes import parse_mode

        names = [m for m in (self.modes or "").split(",") if m.strip() and m.strip() != "none"]
        return [parse_mode(m) for m in names]

    def thresholds(self):
        """The CI gate's limits (`gate.Thresholds`), in percent."""
        from verifier.run.gate import Thresholds

        return Thresholds(*(getattr(self, k) for k in GATE_OPTIONS))

    def stored(self) -> dict:
        """The options that determine every decision, as `run.json` and run stores keep them."""
        out = {}
        for f in fields(self):
            if f.name in OUTPUT_OPTIONS:
                continue
            value = getattr(self, f.name)
            if f.name == "model":
                value = str(self.model_path)
            elif f.name in ("radius", "step"):
                value = list(value)
            elif f.name == "quantized":
                value = [str(q) for q in value]
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out

    def check(self) -> None:
        """Refuse option values and combinations that cannot be run (exit status 2)."""
        from verifier.engine.regions import validate_radius_step

        for r in self.radius:
            for s in self.step:
                validate_radius_step(r, s)
        positive = ("dims", "feature_dims", "max_nodes", "enum_limit", "quantized_enum_limit")
        for name in (*positive, "rollouts", "workers"):
            if getattr(self, name) <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive")
        if self.timeout <= 0:
            raise InputError("--timeout must be positive")
        if self.quantized_timeout is not None and self.quantized_timeout <= 0:
            raise InputError("--quantized-timeout must be positive")
        if self.search == "mcts" and not FAMILIES[self.region].subsets:
            raise InputError(
                "--search mcts searches subsets of generators: use it with --region "
                + " or ".join(f.name for f in FAMILIES.values() if f.subsets)
            )
        if self.cluster and self.workers > 1:
            raise InputError("pass --cluster ADDR or --workers N, not both: a cluster has workers")
        self.mode_options()  # refuses an unknown mode or option before the run directory exists
        self.thresholds()  # refuses limits outside [0, 100] now, not after every input is decided


DEFAULTS = RunConfig()
_TYPES = {
    "model": Path,
    "data_dir": Path,
    "out": Path,
    "resume": Path,
    "baseline": Path,
}


def build_config(given: dict) -> RunConfig:
    """The configuration from the options given on the command line (name -> value; options
    not given are absent). On `resume`, options not given take the stored run's values."""
    given = dict(given)
    for key in ("radius", "step"):
        if key in given:
            given[key] = tuple(given[key])
    if "quantized" in given:
        given["quantized"] = tuple(Path(q) for q in given["quantized"])
    if "no_smt" in given:
        given["use_smt"] = not given.pop("no_smt")
    unknown = set(given) - {f.name for f in fields(RunConfig)}
    if unknown:
        raise InputError(f"unknown options: {', '.join(sorted(unknown))}")
    resume = given.get("resume")
    if resume is not None:
        out = given.get("out")
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise InputError(
                "--resume RUN continues RUN in place: do not also pass a different --out"
            )
        given = {**stored_options(Path(resume)), **given, "out": Path(resume)}
    elif uses_example_limit(given):
        given["limit"] = DEFAULT_EXAMPLE_LIMIT
    config = replace(DEFAULTS, **given)
    config.check()
    return config


def uses_example_limit(given: dict) -> bool:
    """A fresh run of the embedded model with no input selection: the first
    `DEFAULT_EXAMPLE_LIMIT` inputs."""
    return (
        given.get("resume") is None
        and given.get("model") is None
        and not any(given.get(k) for k in ("limit", "indices", "labels"))
    )


def gate_warnings(config: RunConfig) -> list[str]:
    """One line per `--min-*` threshold of at most 1: it means that many percent, not a share."""
    return [
        f"warning: --{k.replace('_', '-')} {v:g} means {v:g}%: thresholds are percentages (0-100)"
        for k in GATE_OPTIONS
        if k.startswith("min_") and (v := getattr(config, k)) is not None and v <= 1
    ]


def stored_options(run_dir: Path) -> dict:
    """The decision options of a run's `run.json`, as `build_config` takes them."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise InputError(f"--resume {run_dir}: not a run directory (no run.json)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--resume {run_dir}: unreadable run.json ({exc})") from None
    if not isinstance(stored, dict):
        raise InputError(f"--resume {run_dir}: run.json does not hold a run configuration")
    names = {f.name for f in fields(RunConfig)} - set(OUTPUT_OPTIONS)
    out = {}
    for key, value in stored.items():
        if key not in names:
            continue
        if key in ("radius", "step"):
            value = tuple(value)
        elif key == "quantized":
            value = tuple(Path(v) for v in value)
        elif key in _TYPES and value is not None:
            value = _TYPES[key](value)
        out[key] = value
    return out
