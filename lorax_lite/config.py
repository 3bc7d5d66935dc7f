"""`LoraConfig`: what to adapt, at which rank and scale, and its validation."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

from .checks import is_float_dtype, is_int, is_number, is_positive, raise_problems
from .decompose import RESIDUAL_INITS
from .targets import Spec, from_serial, most_specific, named_leaves, to_predicate, to_serial
from .weight import LoraWeight, is_lora_node, scale_from_alpha

AXIS_ROLES = ("stack", "in", "out")
# How factors start (see `LoraConfig.init`).
Init = Literal["kaiming", "gaussian", "pissa", "olora", "loftq"]
INITS: tuple[str, ...] = get_args(Init)
# Which biases train in full (see `LoraConfig.bias`); PEFT's ``bias`` field spells them alike.
Bias = Literal["none", "all", "lora_only"]
BIAS_MODES: tuple[str, ...] = get_args(Bias)
_FLAGS = ("use_rslora", "use_dora", "dora_detach_norm")
SEQUENCE_OPTIONS = ("targets", "exclude", "train")
MAPPING_OPTIONS = ("rank_pattern", "alpha_pattern", "axes")
PATTERN_OPTIONS = SEQUENCE_OPTIONS + MAPPING_OPTIONS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Configuration of a LoRA transform.

    Attributes:
        rank: rank ``r`` of every adapter (``rank_pattern`` overrides it per leaf).
        alpha: scaling numerator: an adapter is scaled by ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        dropout: dropout rate on the adapter's input, in training only, in ``[0, 1)``.
        targets: the weights to adapt: regexes matched against whole components of the
            ``/``-joined leaf path (``"query"`` matches ``.../query/kernel``), a callable
            ``(path, leaf) -> bool``, a predicate of `lorax_lite.targets`, or
            ``"all-linear"`` (every float matmul kernel of ``fn`` when `init` is given it;
            else every leaf named ``kernel``). Every pattern option takes these specs.
        exclude: patterns of leaves never adapted, even when a target matches them.
        rank_pattern: ``{pattern: rank}``; the longest matching regex wins, then the first
            key.
        alpha_pattern: ``{pattern: alpha}``, chosen as in ``rank_pattern``.
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).
        init: ``"kaiming"`` or ``"gaussian"`` for ``A`` with ``B`` at zero; or ``"pissa"``
            (SVD of ``W``) or ``"olora"`` (QR of ``W``), which replace the base by the
            residual ``W - s A B`` (see `lorax_lite.decompose`); or ``"loftq"``, which
            with ``ll.init(..., quantization=)`` fits ``A B`` to the quantization error.
        pissa_niter: with ``init="pissa"``: None for the exact SVD, or the number of power
            iterations of a randomized SVD.
        loftq_iter: with ``init="loftq"``: alternations of quantizing and refitting
            (PEFT's ``loftq_iter``).
        dtype: dtype of the ``A`` and ``B`` factors, whatever the base dtype.
        train: patterns of leaves trained in full (a new head, layer norms).
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (the biases of
            adapted modules train).
        axes: ``{pattern: roles}`` naming each axis of a matching weight ``"stack"``,
            ``"in"`` or ``"out"``, for weights of more than two dimensions when `init` is
            not given the function that uses them.
        use_dora: DoRA: each adapted weight becomes ``m * V / ||V||`` with ``V = w + s A B``
            (norm per output unit, ``m`` trained from ``||w||``); matmul and conv kernels.
        dora_detach_norm: treat ``||V||`` as a constant in the backward pass (as PEFT and
            the DoRA paper do); False differentiates through it.

    Example:
        >>> config = LoraConfig(rank=8, alpha=16, targets=("query", "value"))
        >>> config.scale_for(8, 16)
        2.0
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Spec | tuple[Spec, ...] = "all-linear"
    exclude: Spec | tuple[Spec, ...] = ()
    rank_pattern: Mapping[Spec, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[Spec, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init: Init = "kaiming"
    pissa_niter: int | None = None
    loftq_iter: int = 1
    dtype: str = "float32"
    train: Spec | tuple[Spec, ...] = ()
    bias: Bias = "none"
    axes: Mapping[Spec, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    dora_detach_norm: bool = True

    def __post_init__(self):
        problems = _normalize_containers(self)
        problems += _validate(self)
        raise_problems("Invalid LoraConfig", problems)
        # NumPy scalars and dtypes pass validation; plain Python values keep it JSON-ready.
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        for flag in _FLAGS:
            object.__setattr__(self, flag, bool(getattr(self, flag)))
        object.__setattr__(self, "rank", int(self.rank))
        if self.pissa_niter is not None:
            object.__setattr__(self, "pissa_niter", int(self.pissa_niter))
        object.__setattr__(self, "loftq_iter", int(self.loftq_iter))
        object.__setattr__(self, "alpha", _as_float(self.alpha))
        object.__setattr__(self, "dropout", _as_float(self.dropout))
        object.__setattr__(self, "rank_pattern", {k: int(v) for k, v in self.rank_pattern.items()})
        object.__setattr__(
            self, "alpha_pattern", {k: _as_float(v) for k, v in self.alpha_pattern.items()}
        )

    def rank_for(self, path: str, leaf: Any = None) -> int:
        """The rank of the adapter at ``path`` (``rank_pattern`` first, then ``rank``);
        ``leaf``, the weight there, is what callable patterns see."""
        return most_specific(self.rank_pattern, path, leaf, self.rank)

    def alpha_for(self, path: str, leaf: Any = None) -> float:
        """The alpha of the adapter at ``path`` (``alpha_pattern`` first, then ``alpha``);
        ``leaf``, the weight there, is what callable patterns see."""
        return most_specific(self.alpha_pattern, path, leaf, self.alpha)

    def scale_for(self, rank: int, alpha: float) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return scale_from_alpha(alpha, rank, rslora=self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: patterns in their serial form (`lorax_lite.targets.to_serial`);
        a pattern mapping with a key whose serial form is not a string becomes a list of
        ``[key, value]`` pairs.

        Raises:
            TypeError: naming the option, if a pattern is a plain callable (it has no
                serial form; a regex or a predicate object of `lorax_lite.targets` has).
        """
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = _serial(field.name, value) if field.name in PATTERN_OPTIONS else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Inverse of `to_dict`.

        Raises:
            TypeError: if ``data`` is not a mapping.
            ValueError: naming every unknown field, or every invalid value.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"LoraConfig.from_dict expects a dict, got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [repr(k) for k in data if k not in fields]
        if unknown:
            raise ValueError(
                f"Invalid LoraConfig: unknown fields {', '.join(unknown)}; expected some of "
                f"{fields}"
            )
        decoded = {k: _decoded(k, v) if k in PATTERN_OPTIONS else v for k, v in data.items()}
        return cls(**decoded)


def either(choices: Sequence[Any], show: Callable[[Any], str] = repr) -> str:
    """The choices of an option for a message: ``'none', 'all' or 'lora_only'``."""
    shown = [show(c) for c in choices]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _serial(name: str, value: tuple | dict) -> list | dict:
    """A pattern option's JSON-ready form (see `LoraConfig.to_dict`)."""
    try:
        if isinstance(value, tuple):
            return [to_serial(spec) for spec in value]
        pairs = [[to_serial(k), list(v) if isinstance(v, tuple) else v] for k, v in value.items()]
    except TypeError as err:
        raise TypeError(
            f"LoraConfig.to_dict: callable {name} cannot be serialized: {err}"
        ) from None
    return dict(pairs) if all(isinstance(k, str) for k, _ in pairs) else pairs


def _decoded(name: str, value: Any) -> Any:
    """Inverse of `_serial`; a value it cannot read stays as it is, for the config's
    validation to name."""
    try:
        if name in SEQUENCE_OPTIONS and isinstance(value, list):
            return [from_serial(spec) for spec in value]
        if isinstance(value, list):  # [key, value] pairs
            return {from_serial(k): v for k, v in value}
        if isinstance(value, Mapping):
            return {from_serial(k): v for k, v in value.items()}
    except (TypeError, ValueError):
        pass
    return value


def _as_float(value: Any) -> float:
    """A Python float with the value as written: ``np.float32(0.1)`` gives ``0.1``, not
    its binary value ``0.10000000149011612``."""
    return float(str(value)) if isinstance(value, np.floating) else float(value)


def _normalize_containers(config: LoraConfig) -> list[str]:
    """Turns pattern sequences into tuples and pattern dicts into dicts, in place; a problem
    for each field that is neither (the field is then emptied, so validation goes on)."""
    problems = []
    put = functools.partial(object.__setattr__, config)
    for name in SEQUENCE_OPTIONS:
        value = getattr(config, name)
        if isinstance(value, str) or callable(value):
            put(name, (value,))
        elif isinstance(value, Iterable) and not isinstance(value, Mapping):
            put(name, tuple(value))
        else:
            problems.append(
                f"{name} must be a regex, a callable or a sequence of them, got {value!r}"
            )
            put(name, ("all-linear",) if name == "targets" else ())
    for name in MAPPING_OPTIONS:
        value = getattr(config, name)
        if not isinstance(value, Mapping):
            problems.append(f"{name} must be a dict {{regex: value}}, got {value!r}")
            value = {}
        put(name, dict(value))
    axes = {}
    for pattern, roles in config.axes.items():
        if isinstance(roles, str) or not isinstance(roles, Iterable):
            problems.append(f"axes[{pattern!r}] must be a sequence of roles, got {roles!r}")
            roles = ("in", "out")
        axes[pattern] = tuple(roles)
    put("axes", axes)
    return problems


def _validate(config: LoraConfig) -> list[str]:
    problems = []

    def check_rank(name, value):
        if not is_int(value, 1):
            problems.append(f"{name} must be an int >= 1, got {value!r}")

    def check_alpha(name, value):
        if not is_positive(value):
            problems.append(f"{name} must be a finite number > 0, got {value!r}")

    check_rank("rank", config.rank)
    check_alpha("alpha", config.alpha)
    for pattern, value in config.rank_pattern.items():
        check_rank(f"rank_pattern[{pattern!r}]", value)
    for pattern, alpha in config.alpha_pattern.items():
        check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
    if not is_number(config.dropout) or not 0 <= config.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {config.dropout!r}")
    for flag in _FLAGS:
        if not isinstance(getattr(config, flag), bool | np.bool_):
            problems.append(f"{flag} must be True or False, got {getattr(config, flag)!r}")
    if not is_float_dtype(config.dtype):
        problems.append(f"dtype must be a floating dtype such as 'float32', got {config.dtype!r}")
    if config.init not in INITS:
        problems.append(f"init must be one of {INITS}, got {config.init!r}")
    if config.pissa_niter is not None:
        if not is_int(config.pissa_niter, 0):
            problems.append(f"pissa_niter must be None or an int >= 0, got {config.pissa_niter!r}")
        elif config.init != "pissa":
            problems.append(f"pissa_niter is for init='pissa', not init={config.init!r}")
    if not is_int(config.loftq_iter, 1):
        problems.append(f"loftq_iter must be an int >= 1, got {config.loftq_iter!r}")
    elif config.loftq_iter != 1 and config.init != "loftq":
        problems.append(f"loftq_iter is for init='loftq', not init={config.init!r}")
    if config.bias not in BIAS_MODES:
        problems.append(f"bias must be {either(BIAS_MODES)}, got {config.bias!r}")
    if not config.targets:
        problems.append("targets is empty: name at least one weight to adapt")
    strings = lambda patterns: {p for p in patterns if isinstance(p, str)}
    both = sorted(strings(config.targets) & strings(config.exclude))
    if both:
        problems.append(f"patterns both targeted and excluded: {both}")
    for pattern, roles in config.axes.items():
        bad = [r for r in roles if r not in AXIS_ROLES]
        if bad or "in" not in roles or "out" not in roles:
            problems.append(
                f"axes[{pattern!r}] must name each axis one of {AXIS_ROLES}, with at least "
                f"one 'in' and one 'out'; got {roles}"
            )
    return problems + _pattern_problems(config)


def _pattern_problems(config: LoraConfig) -> list[str]:
    """A problem for each pattern `lorax_lite.targets.to_predicate` refuses: no string,
    predicate or callable, or a regex that does not compile."""
    problems = []
    for name in PATTERN_OPTIONS:
        for spec in getattr(config, name):
            try:
                to_predicate(spec)
            except TypeError as err:
                problems.append(f"{name} must be regexes or callables, got {spec!r}: {err}")
            except ValueError as err:
                problems.append(f"{name}: {err}")
    return problems


def tree_conflicts(config: LoraConfig, tree: Any) -> list[str]:
    """Where the adapters of ``tree`` differ from ``config`` in what holds for them all.

    A writer given a ``config`` beside a tree checks it with this: the tree says what its
    adapters are, so a config that says otherwise is a mistake. Ranks and scales may
    differ leaf by leaf (patterns, or a tree edited after `init`), so they are not
    compared, and the config's patterns are never matched; DoRA is each node's own.

    Args:
        config: the configuration the tree is said to be made with.
        tree: a LoRA tree or its trainable partition.

    Returns:
        ``"path: the tree's dropout 0.0, the config's 0.1"`` for each adapter whose
        dropout differs from the config's, or whose recorded ``residual_init`` is not
        the config's ``init``; empty if they agree.
    """
    residual = config.init if config.init in RESIDUAL_INITS else None
    problems = []
    for path, node in named_leaves(tree, is_leaf=is_lora_node):
        if isinstance(node, LoraWeight) and node.a is not None:
            if node.dropout != config.dropout:
                problems.append(
                    f"{path}: the tree's dropout {node.dropout}, the config's {config.dropout}"
                )
            if node.residual_init not in (None, residual):  # None: not recorded (older)
                problems.append(
                    f"{path}: the tree's residual_init {node.residual_init!r}, the config's "
                    f"init {config.init!r}"
                )
    return problems
