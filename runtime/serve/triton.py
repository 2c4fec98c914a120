"""`engine-triton DIR --out REPO`: a Triton Inference Server repository whose python-backend model runs the runtime.

The repository holds one model, `REPO/NAME/config.pbtxt` (inputs, outputs, dynamic batching, instances, the
engine's path as a parameter) and `REPO/NAME/1/model.py` (a copy of `triton_model.py`, which imports this
package inside Triton's python backend), plus `REPO/diffusion_engine_triton.json`, the mark of a repository
this tool wrote. The engine is referenced by absolute path, not copied, unless --copy-engine. The request
handling here (`answer`) needs no Triton: the model file only moves tensors in and out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffusion_engine.engine.atomic import atomic_directory, check_output_dir, run_cli, write_atomic
from diffusion_engine.engine.manifest import read_manifest
from diffusion_engine.runtime.backends import BACKENDS
from diffusion_engine.runtime.pipeline import GenerationResult, Pipeline
from diffusion_engine.runtime.request import GenerationRequest, Job
from diffusion_engine.runtime.serve.scheduler import batch_key, run_together

FORMAT, FORMAT_VERSION = "diffusion-engine-triton", 1
MARKER = "diffusion_engine_triton.json"  # at the repository's root: Triton loads only its folders
CONFIG, VERSION, MODEL_FILE, ENGINE_COPY = "config.pbtxt", "1", "model.py", "engine"
TEMPLATE = Path(__file__).with_name("triton_model.py")
ENGINE_PARAMETER, BACKEND_PARAMETER, EXECUTION_ENV_PARAMETER = "engine_dir", "backend", "EXECUTION_ENV_PATH"
DEFAULT_MODEL_NAME = "diffusion_engine"
DEFAULT_QUEUE_DELAY_US = 20_000
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
RANDOM_SEED = -1  # a request's seed that asks for a random one, as leaving the input out does
IMAGE, SEED, PARAMETERS = "image", "seed", "parameters"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model: Triton's name, data type (TYPE_ without the prefix) and per-row dims."""

    name: str
    data_type: str
    dims: tuple[int, ...] = (1,)
    optional: bool = False

    def pbtxt(self) -> str:
        dims = ", ".join(map(str, self.dims))
        optional = " optional: true" if self.optional else ""
        return f'  {{ name: "{self.name}" data_type: TYPE_{self.data_type} dims: [ {dims} ]{optional} }}'


# Each input but the prompt is optional: left out, it takes generate's default (the engine's, for None).
# Every input is generate's keyword of the same name, one value per row ([batch, 1]).
INPUTS = (
    TensorSpec("prompt", "STRING"),
    TensorSpec("negative_prompt", "STRING", optional=True),
    TensorSpec("seed", "INT64", optional=True),
    TensorSpec("steps", "INT32", optional=True),
    TensorSpec("guidance_scale", "FP32", optional=True),
    TensorSpec("guidance_rescale", "FP32", optional=True),
    TensorSpec("scheduler", "STRING", optional=True),
    TensorSpec("height", "INT32", optional=True),
    TensorSpec("width", "INT32", optional=True),
)
OUTPUTS = (
    TensorSpec(IMAGE, "UINT8", (-1, -1, 3)),
    TensorSpec(SEED, "INT64"),  # the seed each row used: a request without one learns its random seed
    TensorSpec(PARAMETERS, "STRING"),  # generate's parameters, JSON
)


@dataclass(frozen=True)
class RepositoryOptions:
    """What engine-triton writes: the model's name, batching, instances, backend; the engine copied or referenced."""

    model_name: str = DEFAULT_MODEL_NAME
    max_batch: int | None = None  # None: the engine's max batch
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = 1
    backend: str = "auto"
    copy_engine: bool = False
    execution_env: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not MODEL_NAME.fullmatch(self.model_name):
            raise ValueError(f"--model-name {self.model_name!r} must be letters, digits, '_', '.' or '-' "
                             "(a folder name, not starting with '.' or '-')")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"--max-batch {self.max_batch} must be at least 1")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"--max-queue-delay-us {self.max_queue_delay_us} must be >= 0")
        if self.instances < 1:
            raise ValueError(f"--instances {self.instances} must be at least 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")


def is_triton_repository(path: str | os.PathLike) -> bool:
    """True if path is a folder holding the mark this tool writes (its format and an integer version)."""
    try:
        d = json.loads((Path(path) / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and d.get("format") == FORMAT and isinstance(d.get("format_version"), int)


def check_repository_out(out: str | os.PathLike, overwrite: bool, engine_dir: str | os.PathLike) -> None:
    """check_output_dir for a repository: with overwrite, only one this tool wrote (or an empty folder)."""
    check_output_dir(out, overwrite, engine_dir, is_triton_repository, "a Triton model repository")


def _text(value: str) -> str:
    """A protobuf text-format string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def model_config(options: RepositoryOptions, engine_ref: str, max_batch: int) -> str:
    """config.pbtxt: python backend, the inputs and outputs above, dynamic batching, CPU-kind instances
    (the pipeline picks its own device: a GPU-kind group would refuse to load without one), the parameters."""
    parameters = {ENGINE_PARAMETER: engine_ref, BACKEND_PARAMETER: options.backend}
    if options.execution_env is not None:
        parameters[EXECUTION_ENV_PARAMETER] = options.execution_env
    where = "copied into this model's folder" if options.copy_engine else "referenced by path, not copied"
    return "\n".join([
        f"# Written by engine-triton: {FORMAT} {FORMAT_VERSION}. The engine is {where} ({ENGINE_PARAMETER}).",
        f"name: {_text(options.model_name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [", ",\n".join(s.pbtxt() for s in INPUTS), "]",
        "output [", ",\n".join(s.pbtxt() for s in OUTPUTS), "]",
        f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
        "parameters [",
        ",\n".join(f"  {{ key: {_text(k)} value: {{ string_value: {_text(v)} }} }}" for k, v in parameters.items()),
        "]",
        "",
    ])


def write_repository(engine_dir: str | os.PathLike, out: str | os.PathLike, options: RepositoryOptions) -> Path:
    """Write the model repository into out (atomically); the engine is checked first (its manifest and files)."""
    manifest = read_manifest(engine_dir)
    engine = Path(engine_dir).expanduser().resolve()
    max_batch = options.max_batch or manifest.build.max_batch
    with atomic_directory(out, options.overwrite, engine, is_triton_repository, "a Triton model repository") as tmp:
        model = tmp / options.model_name
        (model / VERSION).mkdir(parents=True)
        if options.copy_engine:  # relative: resolved against the model's folder, so the repository can move
            shutil.copytree(engine, model / ENGINE_COPY)
        engine_ref = ENGINE_COPY if options.copy_engine else str(engine)
        write_atomic(model / CONFIG, model_config(options, engine_ref, max_batch))
        write_atomic(model / VERSION / MODEL_FILE, TEMPLATE.read_bytes())
        mark = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": options.model_name,
                "engine": str(engine), "engine_copied": options.copy_engine}
        write_atomic(tmp / MARKER, json.dumps(mark, indent=2) + "\n")
    return Path(out).expanduser().resolve()


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The string parameters of a model config as Triton hands it to the model (JSON: key -> {string_value})."""
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def engine_path(parameters: Mapping[str, str], model_dir: str | os.PathLike) -> Path:
    """The engine a model serves: its parameter, relative to the model's folder (--copy-engine) or absolute."""
    ref = parameters.get(ENGINE_PARAMETER)
    if not ref:
        raise ValueError(f"the model config has no {ENGINE_PARAMETER!r} parameter; write it with engine-triton")
    return Path(model_dir) / ref  # an absolute ref stays itself


def row_arguments(inputs: Mapping[str, np.ndarray], row: int) -> dict[str, Any]:
    """generate's keyword arguments from one row of a request's inputs ([batch, 1] each); absent ones are left out."""
    kwargs: dict[str, Any] = {}
    for spec in INPUTS:
        if spec.name not in inputs:
            continue
        value = np.asarray(inputs[spec.name]).reshape(-1)[row]
        if spec.data_type == "STRING":
            raw = value if isinstance(value, bytes) else str(value).encode()
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{spec.name} is not UTF-8 text") from None
            if spec.name == "scheduler" and not value:
                continue  # an empty scheduler asks for the engine's, as leaving it out does
        elif spec.data_type == "FP32":
            value = float(value)
        else:
            value = int(value)
            if spec.name == "seed" and value == RANDOM_SEED:
                continue
        kwargs[spec.name] = value
    return kwargs


def answer(pipe: Pipeline, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Exception]:
    """Each request's outputs, or the exception that fails it alone (ValueError: a bad request, the engine's message).

    Every row is checked first (`Pipeline.prepare`); rows of all requests that can share a UNet batch (the
    serving scheduler's batch_key: same size, steps, sampler, guidance) run together up to the engine's max
    batch, each with its own seeded noise, so Triton's dynamic batching batches the UNet too.
    """
    answers: list[dict[str, np.ndarray] | Exception | None] = [None] * len(requests)
    rows: list[tuple[int, Job]] = []  # (request, job) for each row of each request checked
    for i, inputs in enumerate(requests):
        try:
            rows += [(i, job) for job in _jobs(pipe, inputs)]
        except ValueError as exc:
            answers[i] = exc
    groups: dict[Any, list[int]] = {}
    for n, (_, job) in enumerate(rows):
        key = batch_key(job)
        groups.setdefault(("alone", n) if key is None else key, []).append(n)
    results: dict[int, GenerationResult] = {}
    size = max(1, pipe.manifest.build.max_batch)
    for group in groups.values():
        for chunk in (group[k : k + size] for k in range(0, len(group), size)):
            try:
                results.update(zip(chunk, run_together(pipe, [rows[n][1] for n in chunk])))
            except Exception as exc:  # this chunk's requests fail; the others are answered
                for n in chunk:
                    if answers[rows[n][0]] is None:
                        answers[rows[n][0]] = exc
    for i, answered in enumerate(answers):
        if answered is None:
            answers[i] = _outputs([results[n] for n, (j, _) in enumerate(rows) if j == i])
    return answers  # type: ignore[return-value]


def _jobs(pipe: Pipeline, inputs: Mapping[str, np.ndarray]) -> list[Job]:
    """One request's rows, each checked against the engine (ValueError naming what is wrong)."""
    if "prompt" not in inputs:
        raise ValueError("the request has no prompt")
    rows = np.asarray(inputs["prompt"]).reshape(-1).shape[0]
    for name, array in inputs.items():
        if np.asarray(array).size != rows:
            raise ValueError(f"{name} has {np.asarray(array).size} values for {rows} prompts; give one per row")
    jobs = [pipe.prepare(GenerationRequest(**row_arguments(inputs, row))) for row in range(rows)]
    sizes = sorted({(j.height, j.width) for j in jobs})
    if len(sizes) > 1:
        raise ValueError(f"the rows of one request must share height and width, got {sizes}")
    return jobs


def _outputs(results: list[GenerationResult]) -> dict[str, np.ndarray]:
    return {
        IMAGE: np.concatenate([r.array for r in results]).astype(np.uint8),
        SEED: np.array([[r.seed] for r in results], dtype=np.int64),
        PARAMETERS: np.array([[json.dumps(r.parameters).encode()] for r in results], dtype=np.object_),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engine-triton", description="Write a Triton Inference Server model repository "
                                "whose python-backend model serves an engine directory with this runtime.")
    p.add_argument("engine", metavar="DIR", help="engine directory made by engine-export")
    p.add_argument("--out", required=True, metavar="REPO", help="model repository folder to create")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help=f"default {DEFAULT_MODEL_NAME}")
    p.add_argument("--max-batch", type=int,
                   help="rows per dynamic batch (max_batch_size; default: the engine's max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help="microseconds Triton holds a request for others to share its UNet batch with (default "
                        f"{DEFAULT_QUEUE_DELAY_US}, as engine-serve's --batch-window; 0: no wait)")
    p.add_argument("--instances", type=int, default=1, help="model instances, each with its own pipeline (default 1)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="the pipeline's backend (default auto)")
    p.add_argument("--copy-engine", action="store_true",
                   help="copy the engine into the repository (default: reference it by absolute path; it must be "
                        "there when Triton loads)")
    p.add_argument("--execution-env", metavar="PATH",
                   help="EXECUTION_ENV_PATH for the python backend: a conda-pack archive or environment folder (with "
                        "bin/activate) that has this package installed; a path as the server sees it")
    p.add_argument("--overwrite", action="store_true", help="replace REPO if it is a repository engine-triton wrote")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("engine-triton", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = RepositoryOptions(args.model_name, args.max_batch, args.max_queue_delay_us, args.instances,
                                    args.backend, args.copy_engine, args.execution_env, args.overwrite)
        read_manifest(args.engine)
        check_repository_out(args.out, args.overwrite, args.engine)
    except (ValueError, OSError) as exc:  # ManifestError is a ValueError
        print(f"engine-triton: error: {exc}", file=sys.stderr)
        return 2
    try:
        out = write_repository(args.engine, args.out, options)
    except (ValueError, OSError) as exc:  # checked above; a full disk or a folder changed since shows here
        print(f"engine-triton: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    engine = Path(args.engine).expanduser().resolve()
    where = f"copied into {out / options.model_name / ENGINE_COPY}" if options.copy_engine else \
        f"referenced at {engine} (not copied: it must be at that path where Triton runs)"
    print(f"wrote {out}: model {options.model_name!r}, engine {where}")
    print(f"serve it: tritonserver --model-repository {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
