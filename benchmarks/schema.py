"""The one result schema of `engine-bench` (version 1), and a validator with readable errors.

Hand-written checks (no jsonschema dependency): `validate(doc)` raises SchemaError naming the
path of the first bad value, e.g. `cases[0].systems.ours.stages.unet.p50: expected number`.
"""

from __future__ import annotations

from typing import Any, Callable

SCHEMA_VERSION = 1
STATS = ("min", "p50", "p90", "mean", "n")
MODES = ("e2e", "unet")


class SchemaError(ValueError):
    """A result document that does not follow the schema; the message names the path."""


Check = Callable[[Any, str], None]


def _fail(path: str, what: str, value: Any) -> None:
    raise SchemaError(f"{path}: expected {what}, got {type(value).__name__} {str(value)[:60]!r}")


def number(nullable: bool = False, minimum: float | None = None) -> Check:
    def check(v: Any, path: str) -> None:
        if v is None and nullable:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            _fail(path, "number" + (" or null" if nullable else ""), v)
        if minimum is not None and v < minimum:
            _fail(path, f"number >= {minimum}", v)
    return check


def integer(nullable: bool = False, minimum: int | None = None) -> Check:
    def check(v: Any, path: str) -> None:
        if v is None and nullable:
            return
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            _fail(path, "integer" + (f" >= {minimum}" if minimum is not None else ""), v)
    return check


def string(nullable: bool = False, choices: tuple[str, ...] | None = None) -> Check:
    def check(v: Any, path: str) -> None:
        if v is None and nullable:
            return
        if not isinstance(v, str) or (choices and v not in choices):
            _fail(path, f"one of {choices}" if choices else "string", v)
    return check


def boolean(v: Any, path: str) -> None:
    if not isinstance(v, bool):
        _fail(path, "boolean", v)


def array(item: Check, min_items: int = 0) -> Check:
    def check(v: Any, path: str) -> None:
        if not isinstance(v, list) or len(v) < min_items:
            _fail(path, f"array of >= {min_items} items", v)
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def obj(required: dict[str, Check], optional: dict[str, Check] | None = None, nullable: bool = False) -> Check:
    def check(v: Any, path: str) -> None:
        if v is None and nullable:
            return
        if not isinstance(v, dict):
            _fail(path, "object", v)
        for key, sub in required.items():
            if key not in v:
                raise SchemaError(f"{path}: missing key {key!r}")
            sub(v[key], f"{path}.{key}")
        for key, sub in (optional or {}).items():
            if key in v:
                sub(v[key], f"{path}.{key}")
    return check


def mapping(value: Check, nullable: bool = False) -> Check:
    def check(v: Any, path: str) -> None:
        if v is None and nullable:
            return
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            _fail(path, "object with string keys", v)
        for key, x in v.items():
            value(x, f"{path}.{key}")
    return check


def anything(v: Any, path: str) -> None:
    pass


STAT = obj({"min": number(minimum=0), "p50": number(minimum=0), "p90": number(minimum=0),
            "mean": number(minimum=0), "n": integer(minimum=1)})
SYSTEM = obj(
    {
        "device": string(choices=("cpu", "cuda")),
        "stages": mapping(STAT),
        "images_per_second": number(nullable=True, minimum=0),
        "overhead": obj({"p50_fraction": number(), "max_fraction": number()}, nullable=True),
        "load_rss_bytes": integer(),
        "peak_rss_bytes": integer(minimum=0),
        "run_rss_increase_bytes": integer(),
        "warm_rss_bytes": integer(),
        "device_memory_bytes": integer(nullable=True, minimum=0),
        "achieved_tflops": mapping(number(minimum=0)),
        "fraction_of_fp16_peak": mapping(number(nullable=True, minimum=0)),
    },
    {"agreement": mapping(number())},
)
FLOPS = obj({"flops": integer(minimum=0), "macs_by_op": mapping(integer(minimum=0)), "unresolved_nodes": integer(minimum=0)})
DECODERS = ("full", "tiny")  # generate's decoder= (engine/specs.py DECODERS)
CASE = obj({
    "mode": string(choices=MODES), "height": integer(minimum=1), "width": integer(minimum=1),
    "batch": integer(minimum=1), "steps": integer(nullable=True, minimum=1),
    "flops": mapping(FLOPS), "systems": obj({"ours": SYSTEM}, ), "ratios": mapping(mapping(number(nullable=True))),
}, {"decoder": string(nullable=True, choices=DECODERS)})  # absent in results before the tiny decoder: full
DOCUMENT = obj({
    "schema_version": integer(minimum=1),
    "tool": string(choices=("engine-bench",)),
    "created": string(),
    "duration_s": number(minimum=0),
    "command": string(),
    "machine": obj({
        "cpu_model": string(), "cpu_cores": integer(minimum=1), "cpu_affinity": integer(minimum=1),
        "threads": integer(minimum=1), "memory_bytes": integer(nullable=True), "platform": string(),
        "python": string(), "load_average_start": array(number(), 3),
        "gpus": array(obj({"name": string(), "memory_bytes": integer(minimum=0)})),
    }, {"load_average_end": array(number(), 3)}),
    "versions": mapping(string(nullable=True)),
    "engine": obj({
        "dir": string(), "manifest_sha256": string(), "family": string(), "source_checkpoint": string(nullable=True),
        "source_digest": string(nullable=True), "parameters": mapping(integer(minimum=0)), "random_weights": boolean,
    }, {"checkpoint_info": anything}),
    "settings": obj({
        "engine": string(), "backend": string(), "sizes": array(array(integer(minimum=1), 2), 1),
        "batches": array(integer(minimum=1), 1), "steps": array(integer(minimum=1)), "scheduler": string(),
        "guidance_scale": number(minimum=0), "warmup": integer(minimum=0), "runs": integer(minimum=1),
        "baselines": array(string()), "checkpoint": string(nullable=True), "mode": string(choices=MODES),
        "prompt": string(), "seed": integer(), "threads": integer(minimum=1),
    }, {"decoders": array(string(choices=DECODERS), 1), "tiny_vae": string(nullable=True), "one_at_a_time": boolean}),
    "cases": array(CASE, 1),
    "notes": array(string()),
})


def validate(doc: Any) -> None:
    """Raise SchemaError unless doc is a version-1 engine-bench result with consistent cases."""
    DOCUMENT(doc, "$")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"$.schema_version: {doc['schema_version']} is not {SCHEMA_VERSION}")
    for i, case in enumerate(doc["cases"]):
        if (case["steps"] is None) != (case["mode"] == "unet"):
            raise SchemaError(f"$.cases[{i}]: steps must be null exactly in unet mode")
        for name, system in case["systems"].items():
            missing = [s for s in (("end_to_end",) if case["mode"] == "e2e" else ("unet",)) if s not in system["stages"]]
            if missing:
                raise SchemaError(f"$.cases[{i}].systems.{name}.stages: missing {missing[0]!r}")
        extra = set(case["ratios"]) - (set(case["systems"]) - {"ours"})
        if extra:
            raise SchemaError(f"$.cases[{i}].ratios: {sorted(extra)} are not measured systems")
