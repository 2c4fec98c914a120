"""The python-backend model engine-triton writes into a repository as `NAME/1/model.py`: one Pipeline per instance.

A template: it runs only inside Triton's python backend (`triton_python_backend_utils` exists there alone),
in a Python that has diffusion-engine installed. Each request gets its own response, its images or its error
(the engine's one-line message); rows of a dynamic batch share UNet batches (`answer`); the model never fails.
"""

from __future__ import annotations

import json
import logging

import triton_python_backend_utils as pb_utils

from diffusion_engine.runtime.pipeline import Pipeline
from diffusion_engine.runtime.serve.triton import (
    BACKEND_PARAMETER,
    INPUTS,
    answer,
    engine_path,
    model_parameters,
)

logger = logging.getLogger("diffusion_engine.runtime.serve.triton_model")


class TritonPythonModel:
    """Triton's python-backend interface: initialize opens the engine, execute answers a list of requests."""

    def initialize(self, args: dict) -> None:
        parameters = model_parameters(json.loads(args["model_config"]))
        engine = engine_path(parameters, args["model_repository"])  # model_repository: this model's folder
        self.pipe = Pipeline.load(engine, backend=parameters.get(BACKEND_PARAMETER) or "auto")
        logger.info("serving %s on %s", engine, self.pipe.backend)

    def execute(self, requests: list) -> list:
        """One response per request, in order: rows of all the requests batched where they can be (`answer`)."""
        inputs = []
        for request in requests:
            tensors = {}
            for spec in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is not None:
                    tensors[spec.name] = tensor.as_numpy()
            inputs.append(tensors)
        try:
            answers = answer(self.pipe, inputs)
        except Exception as exc:  # answer fails requests one by one; anything left fails this batch, not the model
            logger.exception("batch failed")
            answers = [exc] * len(requests)
        return [_response(a) for a in answers]

    def finalize(self) -> None:
        self.pipe.close()


def _response(answered) -> "pb_utils.InferenceResponse":
    """The outputs, or an error: a ValueError's message (the engine's one line), another exception's type too."""
    if isinstance(answered, ValueError):
        return _error(str(answered))
    if isinstance(answered, Exception):
        logger.error("request failed: %s: %s", type(answered).__name__, answered)
        return _error(f"{type(answered).__name__}: {answered}")
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in answered.items()])


def _error(message: str) -> "pb_utils.InferenceResponse":
    """A response carrying only an error: its message's first line (the engine's messages are one line)."""
    lines = message.strip().splitlines()
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(lines[0] if lines else "failed"))
