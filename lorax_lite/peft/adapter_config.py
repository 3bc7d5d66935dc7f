"""``adapter_config.json`` read and checked: every field lorax_lite needs, with PEFT's defaults."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

from ..checks import is_int, is_number, is_positive, raise_problems
from ..config import BIAS_MODES, either
from ..linear_regex import pattern_error
from .format import json_text, key_pattern

# PEFT options that change what the weights mean, which lorax_lite does not represent.
UNSUPPORTED = ("lora_bias", "use_qalora")
UNSUPPORTED_IF_SET = (
    "layer_replication", "alora_invocation_tokens", "target_parameters", "trainable_token_indices"
)  # fmt: skip
# init_lora_weights values that leave the base weights as they were.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Those that train on a modified base (a residual or a quantized copy): the adapter does
# not fit the original base unless PEFT converted it when saving.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def read_peft_config(path: pathlib.Path) -> dict[str, Any]:
    """``adapter_config.json`` parsed and checked, with PEFT's defaults filled in.

    Raises:
        ValueError: naming ``path``: if it is not UTF-8 JSON holding an object, and
            listing every field that is missing, of the wrong type or unsupported.
    """
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not UTF-8 JSON ({type(err).__name__}: {err})") from err
    if not isinstance(config, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(config), "a number")
        raise ValueError(f"{path}: expected a JSON object, found {kind}")
    defaults = {
        "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": None,
        "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
    }  # fmt: skip
    # PEFT writes null for an option left at its default.
    config = {**defaults, **{k: v for k, v in config.items() if v is not None or k not in defaults}}
    raise_problems(f"{path}: invalid or unsupported fields", _config_problems(config))
    return config


def _config_problems(config: dict[str, Any]) -> list[str]:
    """One ``field: expected ..., found ...`` line for each bad field of a PEFT config."""
    problems = []

    def bad(field: str, expected: str) -> None:
        found = json_text(config[field]) if field in config else "nothing (the field is missing)"
        problems.append(f"{field}: expected {expected}, found {found}")

    if config.get("peft_type") != "LORA":
        bad("peft_type", '"LORA"')
    if not is_int(config.get("r"), 1):
        bad("r", "an int >= 1")
    if not is_positive(config.get("lora_alpha")):
        bad("lora_alpha", "a finite number > 0")
    dropout = config["lora_dropout"]
    if not (is_number(dropout) and 0 <= dropout < 1):
        bad("lora_dropout", "a number in [0, 1)")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config[flag], bool):
            bad(flag, "true or false")
    for flag in UNSUPPORTED:
        if config.get(flag) is not None and config.get(flag) is not False:
            bad(flag, "false (lorax_lite adapters are plain LoRA)")
    for field in UNSUPPORTED_IF_SET:
        if config.get(field) not in (None, [], {}):
            bad(field, "null (lorax_lite adapters are plain LoRA)")
    if config["bias"] not in BIAS_MODES:
        bad("bias", either(BIAS_MODES, json_text))
    problems += _pattern_problems(config, "rank_pattern", lambda r: is_int(r, 1), "an int >= 1")
    problems += _pattern_problems(config, "alpha_pattern", is_positive, "a finite number > 0")
    for field in ("target_modules", "modules_to_save"):
        names = config[field]
        if field == "target_modules" and isinstance(names, str):
            if pattern_error(names):
                bad(field, f"a valid regex ({pattern_error(names)})")
        elif names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            bad(field, "a list of module names" + (" or a regex" if field[0] == "t" else ""))
    problems += _init_problems(config["init_lora_weights"])
    return problems


def _init_problems(init: Any) -> list[str]:
    """``init_lora_weights`` must leave the base as it was (the adapter is read onto it)."""
    if isinstance(init, str) and init.split("_")[0] in BASE_CHANGING_INITS:
        return [
            f"init_lora_weights: expected one of {json_text(PLAIN_INITS)}, found "
            f"{json_text(init)}, "
            "which trains on a modified base; save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion to convert it to plain LoRA"
        ]
    if any(init is v or (isinstance(init, str) and init == v) for v in PLAIN_INITS):
        return []
    return [f"init_lora_weights: expected one of {json_text(PLAIN_INITS)}, found {json_text(init)}"]


def _pattern_problems(
    config: dict[str, Any], field: str, valid: Callable[[Any], bool], expected: str
) -> list[str]:
    patterns = config[field]
    if not isinstance(patterns, dict):
        return [f"{field}: expected a JSON object {{regex: value}}, found {json_text(patterns)}"]
    problems = [
        f"{field}[{json_text(key)}]: expected {expected}, found {json_text(value)}"
        for key, value in patterns.items()
        if not valid(value)
    ]
    problems += [
        f"{field}[{json_text(key)}]: expected a valid regex ({error})"
        for key in patterns
        if (error := pattern_error(key) or pattern_error(key_pattern(key)))
    ]
    return problems
