"""The image-start graphs: the encoder's posterior sample and the denoising loop's initial values,
as tiny ONNX graphs.

After the VAE encoder the backend runs one of these instead of host math: on a GPU backend the
encoder's outputs (the posterior mean and std) stay on the device, and the loop's first state and
UNet input come from the device too. One definition serves every backend: ONNX Runtime on the CPU
runs the same graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from diffusion_engine.engine.specs import (
    IMAGE_LATENTS,
    INITIAL_NOISE,
    LATENT_MEAN,
    LATENT_STD,
    MASK,
    MASKED_IMAGE_LATENTS,
    MASKED_IMAGE_START,
    POSTERIOR_NOISE,
    SAMPLE,
    START,
    STATE,
    UNET_BATCH,
    ComponentSpec,
)
from diffusion_engine.engine.step_graph import generated_model


def _posterior() -> list[onnx.NodeProto]:
    """posterior = mean + std * eps, [1, C, h, w] (diffusers' DiagonalGaussianDistribution.sample)."""
    n = helper.make_node
    return [
        n("Mul", [LATENT_STD, POSTERIOR_NOISE], ["spread"], name="spread"),
        n("Add", [LATENT_MEAN, "spread"], ["posterior"], name="posterior"),
    ]


def _start(guided: bool) -> list[onnx.NodeProto]:
    """image latents = the posterior in every image's row; state = [signal * image + noise * initial noise, 0, ...];
    sample = input scale * state[0], doubled when guided."""
    n = helper.make_node
    nodes = [
        n("Shape", [INITIAL_NOISE], ["latent_shape"], name="latent_shape"),  # [N, C, h, w]
        n("Expand", ["posterior", "latent_shape"], [IMAGE_LATENTS], name="image_latents"),
        n("Split", [START], ["signal", "noise_scale", "input_scale"], name="start_scales", axis=0),
        n("Mul", [IMAGE_LATENTS, "signal"], ["kept_signal"], name="kept_signal"),
        n("Mul", [INITIAL_NOISE, "noise_scale"], ["kept_noise"], name="kept_noise"),
        n("Add", ["kept_signal", "kept_noise"], ["latents"], name="latents"),
        n("Unsqueeze", ["latents", "zero"], ["latents1"], name="latents1"),
        n("Concat", ["other_buffers", "latent_shape"], ["zeros_shape"], name="zeros_shape", axis=0),
        n("Expand", ["zero_f32", "zeros_shape"], ["zeros"], name="zeros"),  # [K - 1, N, C, h, w]
        n("Concat", ["latents1", "zeros"], [STATE], name="state", axis=0),
        n("Mul", ["latents", "input_scale"], ["scaled" if guided else SAMPLE], name="scale_input"),
    ]
    if guided:
        nodes.append(n("Concat", ["scaled", "scaled"], [SAMPLE], name="cfg_batch", axis=0))
    return nodes


def _masked() -> list[onnx.NodeProto]:
    """masked-image latents = the posterior in every row of the mask (the UNet's batch)."""
    n = helper.make_node
    return [
        n("Shape", [MASK], ["rows"], name="rows", start=0, end=1),
        n("Shape", ["posterior"], ["latent_dims"], name="latent_dims", start=1),
        n("Concat", ["rows", "latent_dims"], ["masked_shape"], name="masked_shape", axis=0),
        n("Expand", ["posterior", "masked_shape"], [MASKED_IMAGE_LATENTS], name="masked_image_latents"),
    ]


def build_start_graph(spec: ComponentSpec) -> onnx.ModelProto:
    """The image-start graph of `spec` (one of engine.specs.image_graph_specs), checked by onnx.checker."""
    if spec.name == MASKED_IMAGE_START:
        nodes, inits = _posterior() + _masked(), []
    else:
        nodes = _posterior() + _start(_guided(spec))
        inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("zero_f32", TensorProto.FLOAT, [1], [0.0]),
                 helper.make_tensor("other_buffers", TensorProto.INT64, [1], [spec.tensor(STATE).axes[0] - 1])]
    return generated_model(spec, nodes, inits)


def reference_start(feeds: dict, spec: ComponentSpec) -> dict:
    """The image-start graph's definition in float64 numpy (the check at export and in tests)."""
    f = {k: np.asarray(v, np.float64) for k, v in feeds.items()}
    posterior = f[LATENT_MEAN] + f[LATENT_STD] * f[POSTERIOR_NOISE]
    if spec.name == MASKED_IMAGE_START:
        return {MASKED_IMAGE_LATENTS: np.repeat(posterior, len(f[MASK]), axis=0)}
    signal, noise, input_scale = f[START]
    image = np.repeat(posterior, len(f[INITIAL_NOISE]), axis=0)
    state = np.zeros((spec.tensor(STATE).axes[0],) + image.shape)
    state[0] = signal * image + noise * f[INITIAL_NOISE]
    sample = input_scale * state[0]
    return {IMAGE_LATENTS: image, STATE: state, SAMPLE: np.concatenate([sample, sample]) if _guided(spec) else sample}


def _guided(spec: ComponentSpec) -> bool:
    """Whether the first UNet input is the doubled (guided) batch, as the spec declares it."""
    return spec.tensor(SAMPLE).axes[0] == UNET_BATCH
