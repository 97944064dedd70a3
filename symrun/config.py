"""Typed configuration: the single source of symrun's defaults and their meaning.

Every setting a run has lives in one of the dataclasses below, with its default and a docstring.
They are registered in Hydra's ConfigStore (symrun.sweeping.composition), so `model=mlp`, `data=digits`,
`optim.lr=0.05` etc. compose against them and unknown keys are rejected by Hydra itself. YAML
files only hold named deviations: the primary config (symrun/config.yaml) and, in `configs/`,
the experiment and launcher presets.

Only this module and the CLI/sweep edge touch OmegaConf; the library receives `Config` objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration a user wrote that symrun cannot run; the message is one clear line."""


# Settings that moved, with what replaces them: model=linear's own DCS became constraint=dcs.
MOVED = {
    "model.dcs": "constraint.enforce (with constraint=dcs constraint.kind=sum_zero 'constraint.params=[w]')",
    "model.constraint": "constraint=dcs constraint.kind=sum_zero 'constraint.params=[w]' (or kind=subspace)",
    "model.constrained": "constraint=dcs constraint.kind=subspace constraint.path=O.npy 'constraint.params=[w]'",
}


def did_you_mean(name: str, valid) -> str:
    """"; did you mean 'x'?" for the valid name closest to a misspelt one (difflib), or what
    replaces a setting that moved (`MOVED`), else ""."""
    if name in MOVED:
        return f"; it is now {MOVED[name]}"
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _config_dir() -> Path:
    # Installed from a wheel the presets ship as the subpackage symrun/configs; in a checkout
    # (editable install) they stay at the top level beside the package.
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "experiment").is_dir():
            return candidate
    raise FileNotFoundError(f"symrun's configs/ not found next to {here}")


CONFIG_DIR = _config_dir()


# ---------------------------------------------------------------------------------------------
# model=


@dataclass
class ModelConfig:
    name: str = MISSING
    init_scale: float = 1.0
    """Multiplies every initial weight's standard deviation (1.0 = the model's default init)."""


# The options (hadamard, mlp, …, module) are declared one module each under symrun/models/ and
# listed by symrun.models.registry; `model_options()` gives their config dataclasses.


def model_options() -> dict[str, type]:
    """{model option: its config dataclass}, from the model registry."""
    from symrun.models import registry     # the registry's modules subclass ModelConfig, above

    return registry.options()


def __getattr__(name: str) -> Any:
    """`from symrun.config import MLPConfig` (and MODEL_OPTIONS) still work: the model options'
    configs are looked up in the registry when first asked for (PEP 562)."""
    if name == "MODEL_OPTIONS":
        return model_options()
    for cls in (model_options().values() if name.endswith("Config") else ()):
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'symrun.config' has no attribute '{name}'")


def _specs() -> dict:
    from symrun.models import registry

    return registry.specs()


def _model_spec(name: str):
    return _specs().get(name)


# ---------------------------------------------------------------------------------------------
# data=


@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: Optional[int] = None
    """Minibatch size; null = full batch (gradient descent, no sampling noise)."""
    seed: int = 0
    """Seed of the data itself (generation, split); a run's own `seed` drives init, order, noise."""
    task: str = "auto"
    """auto | regression | classification (auto: integer targets with few values → classification)."""


@dataclass
class TeacherDataConfig(DataConfig):
    """Synthetic teacher–student regression, generated from `data.seed`."""

    name: str = "teacher"
    teacher: str = "sparse_linear"
    """sparse_linear | low_rank | mlp."""
    n: int = 200
    n_test: int = 200
    dim: int = 20
    out_dim: int = 1
    nonzero: int = 5
    """sparse_linear: number of non-zero teacher coefficients per output."""
    rank: int = 3
    """low_rank: rank of the teacher matrix."""
    hidden: int = 4
    """mlp: number of tanh units of the teacher."""
    noise_std: float = 0.1
    """Std of the fixed Gaussian noise added to the teacher's targets (label noise per step is noise.label_std)."""
    whiten: bool = False
    """Transform inputs so that XᵀX/n = I exactly (the closed forms of docs/theory.md §5 assume it)."""


@dataclass
class DigitsDataConfig(DataConfig):
    """scikit-learn's bundled 8×8 digits (1797 × 64, 10 classes), pixels scaled to [0, 1]."""

    name: str = "digits"
    test_fraction: float = 0.2


@dataclass
class FileDataConfig(DataConfig):
    """A user's `.npz` (arrays x, y, optionally x_test, y_test) or `.csv` (`target` names the y columns)."""

    name: str = "file"
    path: str = MISSING
    target: Any = None
    """CSV only: the target column(s), a name or a list of names; every other column is a feature."""
    test_fraction: float = 0.0
    """Held-out fraction when the file has no x_test/y_test (0 = no test set)."""


@dataclass
class Cifar10DataConfig(DataConfig):
    """CIFAR-10 read from a local folder in its standard python format (`cifar-10-batches-py`:
    data_batch_1..5, test_batch); never downloads. Pixels standardised per channel."""

    name: str = "cifar10"
    root: str = MISSING
    """The folder holding cifar-10-batches-py (as torchvision's root), or that folder itself."""
    subset: Optional[int] = None
    """Train on this many training images, drawn at random from data.seed; null = all 50000."""
    test_subset: Optional[int] = None
    """Evaluate on this many test images (random, data.seed); null = all 10000."""


@dataclass
class TextDataConfig(DataConfig):
    """Character-level text for next-character prediction: windows of `context` characters,
    targets shifted by one. The vocabulary is the set of characters in the text."""

    name: str = "text"
    path: Optional[str] = None
    """A UTF-8 text file; null = a synthetic English-like text of `length` characters generated
    from a small grammar with data.seed."""
    context: int = 32
    """Characters per window (the transformer's context length)."""
    stride: Optional[int] = None
    """Start of one window to the next; null = context (non-overlapping windows)."""
    test_fraction: float = 0.1
    """The text's last fraction is held out (its own windows) as the test set."""
    length: int = 20000
    """Characters of the generated text (path null)."""


DATA_OPTIONS = {c().name: c for c in (TeacherDataConfig, DigitsDataConfig, FileDataConfig, Cifar10DataConfig,
                                      TextDataConfig)}
TEACHERS = ("sparse_linear", "low_rank", "mlp")
TASKS = ("auto", "regression", "classification")

# ---------------------------------------------------------------------------------------------
# optim, noise, train, metrics


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd | adam | adamw."""
    lr: float = 0.1
    momentum: float = 0.0
    """Heavy-ball momentum (sgd only), torch.optim.SGD convention."""
    weight_decay: float = 0.0
    """λ: coupled L2 (gradient + λθ, penalty λ/2‖θ‖²); decoupled (θ ← θ − lr·λ·θ) for adamw."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"
    """The learning rate of step t = 1 … T (T = the run's total steps; docs/theory.md §1):
    constant η | step: η·gamma^k, k = the milestones passed (t > m) | cosine:
    lr_min + (η − lr_min)(1 + cos(π·(t − warmup)/(T − warmup)))/2. Times the warm-up."""
    warmup: int = 0
    """Linear warm-up over the first `warmup` steps, composed with any schedule: × min(1, t/warmup)."""
    milestones: List[int] = field(default_factory=list)
    """schedule=step: the steps after which the learning rate is multiplied by `gamma`."""
    gamma: float = 0.1
    """schedule=step: the factor of each drop (1: no drop, a control)."""
    lr_min: float = 0.0
    """schedule=cosine: the learning rate it ends at."""


@dataclass
class NoiseConfig:
    label_std: float = 0.0
    """Gaussian noise added to regression targets, resampled every step."""
    label_flip: float = 0.0
    """Classification: probability that a label is replaced by a random other class, every step."""
    temperature: float = 0.0
    """Langevin temperature T: after each step θ ← θ + √(2·lr·T)·ξ."""


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 100
    dtype: str = "float32"
    """float32 | float64."""
    checkpoint_every: int = 0
    """Save the pack's whole training state every N steps (0 = never), so a pack that is preempted,
    times out or is killed continues from it when requeued or rerun, with identical numbers."""


@dataclass
class TasksConfig:
    """A sequence of tasks the same network trains through, one after another (loss of
    plasticity): task 0 is the data as given, task k ≥ 1 a fresh permutation of the input features
    (`change=pixels`, permuted digits) or of the class labels (`change=labels`), drawn from
    (data.seed, k) so every run sees the same sequence. Each task trains `train.steps` steps.

    Remedy, at each switch to a new task (Ash & Adams 2020, shrink and perturb):
    θ ← shrink·θ + perturb·θ₀', θ₀' a fresh draw of the initialisation from the run's own stream."""

    count: int = 1
    """Number of tasks (1: ordinary training on one task)."""
    change: str = "pixels"
    """pixels | labels: what a new task permutes."""
    shrink: float = 1.0
    perturb: float = 0.0


@dataclass
class MetricsConfig:
    """Thresholds of the metrics (docs/theory.md §4); formulas in symrun.analysis.metrics."""

    sparsity_atol: float = 1e-3
    """A group is dead if ‖θ_g‖ ≤ sparsity_atol …"""
    sparsity_rtol: float = 1e-2
    """… or ‖θ_g‖ ≤ sparsity_rtol · max_g ‖θ_g‖."""
    rank_rtol: float = 1e-3
    """Numerical rank counts σᵢ > rank_rtol · σ₁ …"""
    rank_atol: float = 1e-6
    """… and σᵢ > rank_atol, so a product that decayed to zero has rank 0, not 1."""
    homogeneity_threshold: float = 0.1
    """Neurons i, j identical iff 2‖θᵢ−θⱼ‖²/(‖θᵢ‖²+‖θⱼ‖²) < threshold (Chen et al.)."""
    constraint_atol: float = 1e-3
    """A mirror's constraint holds when ‖Oᵀθ‖ ≤ constraint_atol."""
    critical_mirrors: int = 4
    """At the end of a run, the critical weight decay λ_c = −λ_min(Oᵀ∇²L(θ₀)O) of up to this many
    mirrors per declared symmetry (those nearest their constraint); 0 = skip (symrun.analysis.critical)."""
    critical_block: int = 24
    """Blocks Oᵀ∇²L O that Hessian-vector products build are solved exactly up to this size,
    larger ones by this many Lanczos steps. Blocks a model gives in closed form (the hidden
    neurons of mlp and ensemble) are always solved exactly."""
    critical_examples: Optional[int] = 4096
    """The loss whose Hessian gives λ_c is on every training example when there are at most this
    many (exact), else on the first this many (an estimate that bounds the cost on large data);
    null = always every example. Columns critical_wd_examples and critical_wd_exact say which."""
    probe_size: int = 256
    """Inputs (from the test set, else train) on which ensemble members' outputs and the last
    hidden layer's representation (dead_units, feature_rank) are measured."""
    activation_atol: float = 0.0
    """A unit is dead when |activation| ≤ activation_atol on every probe input (0: never fires)."""


@dataclass
class SymmetryConfig:
    """Symmetry removal, the control under which symmetry-induced structure should not appear."""

    remove: bool = False
    """The network uses θ + b with a fixed random b ~ N(0, remove_std²) per entry, drawn from the
    run's seed, while weight decay acts on θ: almost every mirror is gone (Ziyin et al., ICLR 2025,
    "Remove symmetries to control model expressivity"; docs/theory.md §3)."""
    remove_std: float = 0.3
    """Standard deviation of the fixed offsets b."""


@dataclass
class ConstraintConfig:
    """A linear constraint Oᵀθ = 0 on named parameters, measured every log step as
    constraint_violation = ‖Oᵀθ‖ and constraint_zeros, and (`enforce`) made exact by DCS
    (docs/theory.md §6): θ is trained as θ = (I − OOᵀ)w + O(u⊙v) with weight decay on w, u, v, so
    each cᵢ = (Oᵀθ)ᵢ has a sign mirror and is exactly 0 once λ ≥ |∂ℓ/∂cᵢ| at cᵢ = 0. Choose with
    `constraint=dcs`; which constraint is `kind`, `params`, `per`, `path`, whether it is enforced
    is `enforce`."""

    name: str = "none"
    """none | dcs."""
    enforce: bool = True
    """true: DCS trains θ as above; false: θ is trained as itself (the unconstrained baseline) and
    the same constraint is only measured, so the two arms of a sweep over `constraint.enforce`
    log the same columns."""
    kind: str = "sparse"
    """sparse (O = I, θ = u⊙v: spred, an exact lasso) | sum_zero (O spans the sums named by `per`)
    | subspace (O read from `path`, orthonormalised) | group (θ = s·w with one scalar s per
    parameter: each named parameter is switched off as a whole — group sparsity)."""
    params: List[str] = field(default_factory=list)
    """The parameters constrained, by name (see `symrun check`'s table or params.pt); [] = all."""
    per: str = "output"
    """sum_zero: output (each slice along a parameter's last axis sums to 0: a (out, in) weight's
    incoming weights per output unit) | layer (all entries of the parameter sum to 0)."""
    path: Optional[str] = None
    """subspace: a .npy, or a .npz whose array `O` (else its only array) is (entries of the
    parameter per run, k); its columns are orthonormalised (QR)."""


CONSTRAINT_KINDS = ("sparse", "sum_zero", "subspace", "group")


@dataclass
class ReportConfig:
    """How a sweep's figures are written (symrun.analysis.figures): a journal column wide (3.4 in)."""

    formats: List[str] = field(default_factory=lambda: ["png"])
    """Files each figure is written as, e.g. [png,pdf] or [svg]: png | pdf | svg (pdf and svg are
    vector, their text kept as text). `symrun report DIR --formats png,pdf` redraws a folder."""


REPORT_FORMATS = ("png", "pdf", "svg")
SCHEDULES = ("constant", "step", "cosine")


@dataclass
class Config:
    model: Any = MISSING
    """A model option's config (symrun.models.registry): typed, or a user's module (model=module)."""
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    symmetry: SymmetryConfig = field(default_factory=SymmetryConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    seed: int = 0
    """Seeds the run's init, minibatch order and noise (each from its own stream)."""
    device: str = "auto"
    """auto | cpu | cuda (auto: cuda when available)."""
    name: str = "default"
    """Sweep label: results go to outputs/<name>/<timestamped id>/ (letters, digits, . _ -; a suite's
    members are <suite>/<member>)."""
    pack_size: Optional[int] = None
    """Most runs trained together as one batched model; null = as many as fit in 2 GiB, from the
    model's parameters and the activations a step saves (symrun.training.memory). Set it to cap packs,
    e.g. to spread a grid over more cluster jobs."""


# Settings that say *where/how* a run executes, not *what* it computes: left out of run ids.
EXECUTION_KEYS = ("device", "name", "pack_size", "train.checkpoint_every", "report.formats")
# Settings that may differ between runs of one pack (held as per-run tensors by the engine).
PER_RUN_KEYS = (
    "seed", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.schedule", "optim.warmup", "optim.gamma",
    "optim.lr_min",
    "noise.label_std", "noise.label_flip", "noise.temperature", "tasks.shrink", "tasks.perturb",
)
TASK_CHANGES = ("pixels", "labels")


def total_steps(cfg: Config) -> int:
    """Steps a run trains in all: train.steps per task."""
    return cfg.train.steps * cfg.tasks.count


# ---------------------------------------------------------------------------------------------
# From Hydra's DictConfig / a saved dict to a typed, validated Config


def to_config(cfg: DictConfig | dict) -> Config:
    """Typed `Config` from a composed DictConfig or a plain dict (e.g. a run's saved config.yaml).

    A key the schema lacks (e.g. a mistyped `+optim.weight_decy=1`, which Hydra accepts and
    the dataclass would silently drop) is an error."""
    if not isinstance(cfg, DictConfig):
        cfg = _structured(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
        obj.model = _typed_model(obj.model)
        unknown = set(flatten(OmegaConf.to_container(cfg))) - set(flatten(to_dict(obj)))
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"missing required setting '{key}' (set it on the command line, e.g. {key}=...)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown setting '{key}'" + did_you_mean(key, flatten(to_dict(obj))))
    return validate(obj)


def _typed_model(model: Any) -> Any:
    """A model option whose Hydra node is a plain mapping (model=module: any constructor argument
    is a key) as its typed config, by the option's `from_plain`."""
    if not isinstance(model, dict):
        return model
    spec = _model_spec(model.get("name"))
    if spec is None:
        raise ConfigError(f"unknown model option '{model.get('name')}'")
    return spec.config.from_plain(model)


def _linear_constraint(d: dict) -> dict:
    """A config model=linear saved with its own DCS (model.constraint, .constrained, .dcs) as the
    constraint=dcs it now is, so old sweep folders still read and resume (Θ's sum-to-zero is
    kind=sum_zero on w; a prefix needs a file of O, so it stays unreadable, with one line)."""
    m = dict(d["model"])
    kind = m.pop("constraint", "none")
    m.pop("constrained", None)
    enforce = bool(m.pop("dcs"))
    if kind == "prefix":
        raise ConfigError("a saved model.constraint=prefix is now constraint=dcs constraint.kind=subspace with a file of O")
    out = {**d, "model": m}
    if kind == "sum_to_zero":
        out["constraint"] = {**ConstraintConfig().__dict__, "name": "dcs", "kind": "sum_zero", "params": ["w"], "enforce": enforce}
    return out


def _structured(d: dict) -> DictConfig:
    if "offset_std" in d.get("model", {}):     # saved before symmetry removal became symmetry.*
        std = d["model"]["offset_std"]
        d = {**d, "model": {k: v for k, v in d["model"].items() if k != "offset_std"}}
        d.setdefault("symmetry", {"remove": std > 0, "remove_std": std if std > 0 else SymmetryConfig().remove_std})
    if d.get("model", {}).get("name") == "linear" and "dcs" in d["model"]:   # saved before constraint.enforce
        d = _linear_constraint(d)
    model = d.get("model", {}).get("name") if isinstance(d.get("model"), dict) else None
    data_cls = DATA_OPTIONS.get(d.get("data", {}).get("name"))
    if _model_spec(model) is None or data_cls is None:
        raise ConfigError(f"unknown model or data option in saved config: {d.get('model')}, {d.get('data')}")
    try:
        return OmegaConf.merge(_schema(model, data_cls), d)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"unknown setting '{key}'" if "not in" in str(e) and key else str(e).splitlines()[0]) from None


def model_node(name: str) -> Any:
    """What Hydra's ConfigStore holds for model option `name`: its config dataclass, or the plain
    mapping its spec gives (model=module, whose keys are a user's constructor arguments)."""
    spec = _model_spec(name)
    return spec.node() if spec.node is not None else spec.config


@functools.lru_cache(maxsize=None)
def _schema(model: str, data_cls: type) -> DictConfig:
    node = model_node(model)
    return OmegaConf.structured(Config(model=node() if isinstance(node, type) else node, data=data_cls()))   # merge never mutates it


@functools.lru_cache(maxsize=None)
def default_values(model_cls: type, data_cls: type) -> dict[str, Any]:
    """Flattened defaults of a Config with these model and data options."""
    return flatten(to_dict(Config(model=model_cls(), data=data_cls())))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a Config (for YAML, hashing and tables), as dataclasses.asdict gives
    it; written out because asdict deep-copies every leaf (0.1 ms a config, and a sweep asks for
    one per run several times: run ids, pack keys, the data key, YAML)."""
    return {name: _plain(getattr(cfg, name)) for name in _field_names(type(cfg))}


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_LEAVES = frozenset((int, float, str, bool, type(None)))


def _plain(v: Any) -> Any:
    if type(v) in _LEAVES:               # most of a config (checked first: a failed hasattr costs an exception)
        return v
    if hasattr(v, "to_plain"):           # a config whose keys are not its fields (model=module)
        return v.to_plain()
    if hasattr(type(v), "__dataclass_fields__"):
        return to_dict(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} → {'optim.lr': 0.1}; lists become their str() so cells stay scalar."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v) if isinstance(v, (list, tuple)) else v
    return out


def flattened(cfg: Any) -> dict[str, Any]:
    """flatten(to_dict(cfg)), in one pass over the dataclasses: run ids, pack keys and validation
    ask for it once or more a run."""
    out: dict[str, Any] = {}
    _flat_into(cfg, "", out)
    return out


def flattened_field(cfg: Any, name: str) -> dict[str, Any]:
    """The entries of flattened(cfg) under its field `name`."""
    out: dict[str, Any] = {}
    _flat_into(cfg, "", out, (name,))
    return out


def _flat_into(cfg: Any, prefix: str, out: dict[str, Any], names: Optional[tuple[str, ...]] = None) -> None:
    for name in names or _field_names(type(cfg)):
        v = getattr(cfg, name)
        if type(v) in _LEAVES:
            out[prefix + name] = v
        elif hasattr(type(v), "__dataclass_fields__") and not hasattr(v, "to_plain"):
            _flat_into(v, f"{prefix}{name}.", out)
        else:                                # lists, mappings, model=module's config: as flatten has them
            out.update(flatten({name: _plain(v)}, prefix))


def validate(cfg: Config) -> Config:
    """Check ranges and names once, at the edge; raise ConfigError with a one-line message. No
    check reads a run's `seed`: a grid's runs that differ in it alone are validated once
    (composition.Shape.run), so a check of the seed would have to go there too."""
    m, d, o, n, t, mt = cfg.model, cfg.data, cfg.optim, cfg.noise, cfg.train, cfg.metrics
    checks = [
        (o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be a positive number, got {o.lr}"),
        (o.weight_decay >= 0 and math.isfinite(o.weight_decay), f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}"),
        (o.name in ("sgd", "adam", "adamw"), f"optim.name must be sgd, adam or adamw, got '{o.name}'"),
        (o.momentum == 0 or o.name == "sgd", "optim.momentum applies to sgd only (adam uses optim.betas)"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}"),
        (o.eps > 0, f"optim.eps must be a positive number, got {o.eps}"),
        (o.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}, got '{o.schedule}'"),
        (o.warmup >= 0, f"optim.warmup must be >= 0 steps, got {o.warmup}"),
        (0 < o.gamma < math.inf and all(m >= 1 for m in o.milestones),
         f"optim.gamma must be > 0 and optim.milestones steps >= 1, got {o.gamma} and {list(o.milestones)}"),
        (0 <= o.lr_min < math.inf, f"optim.lr_min must be a number >= 0, got {o.lr_min}"),
        (0 <= n.label_std < math.inf, f"noise.label_std must be a number >= 0, got {n.label_std}"),
        (0 <= n.label_flip <= 1, f"noise.label_flip must be in [0, 1], got {n.label_flip}"),
        (0 <= n.temperature < math.inf, f"noise.temperature must be a number >= 0, got {n.temperature}"),
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (cfg.tasks.count >= 1, f"tasks.count must be >= 1, got {cfg.tasks.count}"),
        (cfg.tasks.change in TASK_CHANGES, f"tasks.change must be one of {', '.join(TASK_CHANGES)}, got '{cfg.tasks.change}'"),
        (min(cfg.tasks.shrink, cfg.tasks.perturb) >= 0 and math.isfinite(cfg.tasks.shrink + cfg.tasks.perturb),
         f"tasks.shrink and tasks.perturb must be >= 0, got {cfg.tasks.shrink} and {cfg.tasks.perturb}"),
        (t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (0 = off), got {t.checkpoint_every}"),
        (t.dtype in ("float32", "float64"), f"train.dtype must be float32 or float64, got '{t.dtype}'"),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"), f"device must be auto, cpu or cuda, got '{cfg.device}'"),
        (cfg.pack_size is None or cfg.pack_size >= 1, f"pack_size must be >= 1 or null, got {cfg.pack_size}"),
        (m.init_scale >= 0, f"model.init_scale must be >= 0, got {m.init_scale}"),
        (cfg.symmetry.remove_std >= 0, f"symmetry.remove_std must be >= 0, got {cfg.symmetry.remove_std}"),
        (mt.critical_mirrors >= 0 and mt.critical_block >= 1 and (mt.critical_examples is None or mt.critical_examples >= 1),
         "metrics.critical_mirrors must be >= 0, metrics.critical_block and metrics.critical_examples >= 1"),
        (d.batch_size is None or d.batch_size >= 1, f"data.batch_size must be >= 1 or null, got {d.batch_size}"),
        (d.task in TASKS, f"data.task must be one of {', '.join(TASKS)}, got '{d.task}'"),
        (min(mt.sparsity_atol, mt.sparsity_rtol, mt.rank_rtol, mt.rank_atol, mt.constraint_atol, mt.activation_atol) >= 0,
         "metrics thresholds must be >= 0"),
        (mt.probe_size >= 1, f"metrics.probe_size must be >= 1, got {mt.probe_size}"),
        (mt.homogeneity_threshold >= 0, f"metrics.homogeneity_threshold must be >= 0, got {mt.homogeneity_threshold}"),
        (len(cfg.report.formats) >= 1 and all(f in REPORT_FORMATS for f in cfg.report.formats),
         f"report.formats must list some of {', '.join(REPORT_FORMATS)}, e.g. [png,pdf]; got {list(cfg.report.formats)}"),
    ]
    spec = _model_spec(m.name)
    checks += spec.checks(cfg)
    # A model that reads one data option (transformer: text) and that option need each other.
    readers = [s for s in _specs().values() if s.reads == d.name]
    for s in [spec] if spec.reads else readers[:1]:
        checks.append((m.name == s.name and d.name == s.reads, f"model={s.name} reads data={s.reads}, and "
                       f"data={s.reads} needs model={s.name} (got model={m.name}, data={d.name})"))
    text = isinstance(d, TextDataConfig)
    if text:
        checks += [
            (d.context >= 1 and (d.stride is None or d.stride >= 1), "data.context and data.stride must be >= 1"),
            (0 <= d.test_fraction < 1, f"data.test_fraction must be in [0, 1), got {d.test_fraction}"),
            (d.length >= 2, f"data.length must be >= 2, got {d.length}"),
            (d.task in ("auto", "classification"), "data=text is classification (next character)"),
            (n.label_flip == 0, "noise.label_flip is not supported with data=text"),
            (cfg.tasks.count == 1 or cfg.tasks.change == "labels",
             "data=text task sequences permute characters (tasks.change=labels), not positions"),
            (d.path is None or Path(d.path).expanduser().is_file(), f"data.path does not exist or is not a file: {d.path}"),
        ]
    if isinstance(d, Cifar10DataConfig):
        checks += [
            (all(v is None or v >= 1 for v in (d.subset, d.test_subset)), "data.subset and data.test_subset must be >= 1 or null"),
            (d.task in ("auto", "classification"), "data=cifar10 is classification"),
            (Path(d.root).expanduser().is_dir(), f"data.root is not a folder: {d.root} (the folder holding cifar-10-batches-py)"),
        ]
    if isinstance(d, TeacherDataConfig):
        checks += [
            (d.teacher in TEACHERS, f"data.teacher must be one of {', '.join(TEACHERS)}, got '{d.teacher}'"),
            (d.n >= 1 and d.n_test >= 0 and d.dim >= 1 and d.out_dim >= 1, "data.n, data.dim, data.out_dim must be >= 1 and data.n_test >= 0"),
            (not d.whiten or d.n >= d.dim, f"data.whiten needs data.n >= data.dim, got n={d.n}, dim={d.dim}"),
            (d.noise_std >= 0, f"data.noise_std must be >= 0, got {d.noise_std}"),
            (min(d.nonzero, d.rank, d.hidden) >= 1, "data.nonzero, data.rank and data.hidden must be >= 1"),
        ]
    if isinstance(d, (DigitsDataConfig, FileDataConfig)):
        checks.append((0 <= d.test_fraction < 1, f"data.test_fraction must be in [0, 1), got {d.test_fraction}"))
    if isinstance(d, FileDataConfig):
        checks.append((Path(d.path).expanduser().is_file(), f"data.path does not exist or is not a file: {d.path}"))
    checks += _constraint_checks(cfg)
    if isinstance(d, FileDataConfig):
        checks.append(_target_check(d))
    # No setting means anything at inf or NaN (one that would diverge at once, or allocate forever)
    infinite = [k for k, v in flattened(cfg).items() if isinstance(v, float) and not math.isfinite(v)]
    checks.append((not infinite, f"{infinite[0]} must be a finite number, got {_get(cfg, infinite[0])}" if infinite else ""))
    checks.append(_name_check(cfg.name))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.constraint.path is not None:
        cfg.constraint.path = str(Path(cfg.constraint.path).expanduser().resolve())
    # Stored absolute: a resume, a report or a cluster job may start in another folder.
    if isinstance(d, (FileDataConfig, TextDataConfig)) and d.path is not None:
        d.path = str(Path(d.path).expanduser().resolve())
    if isinstance(d, Cifar10DataConfig):
        d.root = str(Path(d.root).expanduser().resolve())
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), cfg)


NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def _name_check(name: str) -> tuple[bool, str]:
    """`name` becomes folders under --outputs: relative, plain parts (a suite's is suite/member)."""
    parts = name.split("/")
    ok = 1 <= len(parts) <= 2 and all(NAME_PART.fullmatch(p) and p != ".." for p in parts)
    return ok, (f"name must be a plain folder name (letters, digits, '.', '_', '-'; at most 100 characters), "
                f"got {name[:60]!r}{'…' if len(name) > 60 else ''}")


def _target_check(d: FileDataConfig) -> tuple[bool, str]:
    """data.target: a column name or a list of them; stored as a list."""
    if isinstance(d.target, str):
        d.target = [d.target]
    ok = d.target is None or (isinstance(d.target, list) and d.target and all(isinstance(t, str) for t in d.target))
    return bool(ok), f"data.target must be a column name or a list of column names, got {d.target!r}"


def _constraint_checks(cfg: Config) -> list[tuple[bool, str]]:
    c = cfg.constraint
    if c.name == "none":
        return [(c == ConstraintConfig(), "constraint.* settings need constraint=dcs")]
    path = c.path
    return [
        (c.name == "dcs", f"constraint must be none or dcs, got '{c.name}'"),
        (c.kind in CONSTRAINT_KINDS, f"constraint.kind must be one of {', '.join(CONSTRAINT_KINDS)}, got '{c.kind}'"),
        (c.per in ("output", "layer"), f"constraint.per must be output or layer, got '{c.per}'"),
        ((c.kind == "subspace") == (path is not None), "constraint.path is needed by, and only by, constraint.kind=subspace"),
        (path is None or Path(path).expanduser().is_file(), f"constraint.path does not exist or is not a file: {path}"),
        (not (cfg.symmetry.remove and c.enforce),
         "constraint=dcs and symmetry.remove=true cannot be combined (the offsets would move the constraint)"),
    ]
