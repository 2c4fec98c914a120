"""The fused step graph: classifier-free guidance + one sampler update (+ inpainting's masked blend),
as a tiny ONNX graph.

After each UNet call the backend runs this graph. It reads the plan's tables (timesteps, input
scales, coefficients, blend scales) with its own step counter and returns the next state, the
next UNet input and timestep, and the advanced counter: a denoising step needs no host math and
no host input, so a step (UNet + this graph) can be captured once and replayed.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from diffusion_engine.engine.specs import (
    BLEND,
    COEFFS,
    GUIDANCE_RESCALE,
    GUIDANCE_SCALE,
    IMAGE_LATENTS,
    INITIAL_NOISE,
    INPUT_SCALES,
    MASK,
    NOISE,
    NOISE_PRED,
    SAMPLE_OUT,
    STATE,
    STATE_OUT,
    STEP,
    STEP_OUT,
    TIMESTEP_OUT,
    TIMESTEPS,
    ComponentSpec,
    StepFeatures,
)

STEP_OPSET = 17
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}


def value_infos(tensors) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype], list(t.axes)) for t in tensors]


def _const(name: str, values: list, dtype: int = TensorProto.INT64) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, [len(values)], values)


def _guidance(guided: bool, rescaled: bool) -> list[onnx.NodeProto]:
    """m = uncond + g * (cond - uncond) over the [uncond; cond] batch (then rescaled), or m = noise_pred."""
    if not guided:
        return [helper.make_node("Identity", [NOISE_PRED], ["m"], name="unguided")]
    return [
        helper.make_node("Split", [NOISE_PRED], ["uncond", "cond"], name="split_cfg", axis=0),
        helper.make_node("Sub", ["cond", "uncond"], ["delta"], name="cfg_delta"),
        helper.make_node("Mul", ["delta", GUIDANCE_SCALE], ["scaled_delta"], name="cfg_scale"),
        helper.make_node("Add", ["uncond", "scaled_delta"], ["cfg" if rescaled else "m"], name="cfg"),
    ] + (_rescale() if rescaled else [])


def _spread(x: str) -> list[onnx.NodeProto]:
    """x_spread = sum over (C, H, W) of (x - mean)^2 per image, [B, 1, 1, 1]."""
    n = helper.make_node
    return [
        n("ReduceMean", [x], [f"{x}_mean"], name=f"{x}_mean", axes=[1, 2, 3], keepdims=1),
        n("Sub", [x, f"{x}_mean"], [f"{x}_centred"], name=f"{x}_centred"),
        n("ReduceSumSquare", [f"{x}_centred"], [f"{x}_spread"], name=f"{x}_spread", axes=[1, 2, 3], keepdims=1),
    ]


def _rescale() -> list[onnx.NodeProto]:
    """m = cfg * (1 + r * (std(cond) / std(cfg) - 1)): diffusers' rescale_noise_cfg, per image.

    The std ratio is sqrt(spread(cond) / spread(cfg)): the 1 / (n - 1) of each std cancels.
    """
    n = helper.make_node
    return _spread("cond") + _spread("cfg") + [
        n("Div", ["cond_spread", "cfg_spread"], ["variance_ratio"], name="variance_ratio"),
        n("Sqrt", ["variance_ratio"], ["std_ratio"], name="std_ratio"),
        n("Sub", ["std_ratio", "one"], ["ratio_minus_one"], name="ratio_minus_one"),
        n("Mul", ["ratio_minus_one", GUIDANCE_RESCALE], ["rescale_shift"], name="rescale_shift"),
        n("Add", ["rescale_shift", "one"], ["rescale_factor"], name="rescale_factor"),
        n("Mul", ["cfg", "rescale_factor"], ["m"], name="rescaled_cfg"),
    ]


def _update(out: str) -> list[onnx.NodeProto]:
    """out = coeffs[step] @ [state; m; noise[min(step, rows - 1)]], one MatMul."""
    n = helper.make_node
    return [
        n("Gather", [COEFFS, STEP], ["row"], name="coeff_row", axis=0),  # [1, K, K+2]
        n("Squeeze", ["row", "zero"], ["matrix"], name="coeff_matrix"),  # [K, K+2]
        n("Shape", [NOISE], ["noise_rows"], name="noise_rows", start=0, end=1),
        n("Cast", ["noise_rows"], ["noise_rows32"], name="noise_rows32", to=TensorProto.INT32),
        n("Sub", ["noise_rows32", "one32"], ["last_noise"], name="last_noise"),
        n("Min", [STEP, "last_noise"], ["noise_index"], name="noise_index"),
        n("Gather", [NOISE, "noise_index"], ["fresh"], name="fresh_noise", axis=0),  # [1, B, C, H, W]
        n("Unsqueeze", ["m", "zero"], ["m1"], name="m1"),
        n("Concat", [STATE, "m1", "fresh"], ["stack"], name="stack", axis=0),  # [K+2, B, C, H, W]
        n("Shape", ["stack"], ["stack_rows"], name="stack_rows", start=0, end=1),
        n("Concat", ["stack_rows", "minus_one"], ["flat_shape"], name="flat_shape", axis=0),
        n("Reshape", ["stack", "flat_shape"], ["flat"], name="flatten"),
        n("MatMul", ["matrix", "flat"], ["updated"], name="update"),  # [K, B*C*H*W]
        n("Shape", [STATE], ["state_shape"], name="state_shape"),
        n("Reshape", ["updated", "state_shape"], [out], name="updated_state"),
    ]


def _blend(updated: str) -> list[onnx.NodeProto]:
    """state_out[0] = kept + mask * (updated[0] - kept), kept = blend[step, 0] * image + blend[step, 1] * noise0:
    the region outside the mask is the image noised to the next evaluation's level (diffusers' 4-channel
    inpainting); the other state buffers pass through."""
    n = helper.make_node
    return [
        n("Gather", [BLEND, STEP], ["blend_row"], name="blend_row", axis=0),  # [1, 2]
        n("Split", ["blend_row"], ["signal", "noise_scale"], name="blend_scales", axis=1),  # [1, 1] each
        n("Mul", [IMAGE_LATENTS, "signal"], ["kept_signal"], name="kept_signal"),
        n("Mul", [INITIAL_NOISE, "noise_scale"], ["kept_noise"], name="kept_noise"),
        n("Add", ["kept_signal", "kept_noise"], ["kept"], name="kept"),
        n("Gather", [updated, "zero_index"], ["updated_latents"], name="updated_latents", axis=0),
        n("Sub", ["updated_latents", "kept"], ["repaint"], name="repaint"),
        n("Mul", ["repaint", MASK], ["masked_repaint"], name="masked_repaint"),
        n("Add", ["kept", "masked_repaint"], ["blended"], name="blended"),
        n("Unsqueeze", ["blended", "zero"], ["blended1"], name="blended1"),
        n("Shape", [updated], ["buffers"], name="buffers", start=0, end=1),
        n("Slice", [updated, "one64", "buffers", "zero"], ["other_buffers"], name="other_buffers"),
        n("Concat", ["blended1", "other_buffers"], [STATE_OUT], name="state_out", axis=0),
    ]


def _next_inputs(guided: bool) -> list[onnx.NodeProto]:
    """The next UNet input (scaled latents, doubled when guided), its timestep, step + 1."""
    n = helper.make_node
    nodes = [
        n("Add", [STEP, "one32"], [STEP_OUT], name="step_out"),
        n("Shape", [TIMESTEPS], ["evaluations"], name="evaluations"),
        n("Cast", ["evaluations"], ["evaluations32"], name="evaluations32", to=TensorProto.INT32),
        n("Sub", ["evaluations32", "one32"], ["last_evaluation"], name="last_evaluation"),
        n("Min", [STEP_OUT, "last_evaluation"], ["next"], name="next_index"),
        n("Gather", [TIMESTEPS, "next"], [TIMESTEP_OUT], name="timestep_out", axis=0),
        n("Gather", [INPUT_SCALES, "next"], ["next_scale"], name="next_scale", axis=0),
        n("Gather", [STATE_OUT, "zero_index"], ["latents"], name="latents", axis=0),
        n("Mul", ["latents", "next_scale"], ["scaled" if guided else SAMPLE_OUT], name="scale_input"),
    ]
    if guided:
        nodes.append(n("Concat", ["scaled", "scaled"], [SAMPLE_OUT], name="cfg_batch", axis=0))
    return nodes


def build_step_graph(spec: ComponentSpec, features: StepFeatures) -> onnx.ModelProto:
    """The step graph of `spec` (engine.specs.step_spec of `features`), checked by onnx.checker."""
    updated = "state_updated" if features.masked else STATE_OUT
    nodes = _guidance(features.guided, features.rescaled) + _update(updated)
    nodes += (_blend(updated) if features.masked else []) + _next_inputs(features.guided)
    inits = [
        _const("zero", [0]),
        _const("one64", [1]),
        _const("minus_one", [-1]),
        _const("one32", [1], TensorProto.INT32),
        helper.make_tensor("zero_index", TensorProto.INT32, [], [0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    return generated_model(spec, nodes, inits)


def generated_model(spec: ComponentSpec, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    """A generated graph with the spec's inputs and outputs, at STEP_OPSET, checked by onnx.checker."""
    graph = helper.make_graph(nodes, spec.name, value_infos(spec.inputs), value_infos(spec.outputs), initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", STEP_OPSET)],
                              producer_name="diffusion-engine")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_step(feeds: dict, features: StepFeatures) -> dict:
    """The step graph's definition in float64 numpy (the check at export and in tests)."""
    import numpy as np

    guided = features.guided
    f = {k: np.asarray(v, np.float64) if k != STEP else int(np.asarray(v)[0]) for k, v in feeds.items()}
    step = f[STEP]
    m = f[NOISE_PRED]
    if guided:
        uncond, cond = np.split(m, 2)
        m = uncond + f[GUIDANCE_SCALE][0] * (cond - uncond)
    if GUIDANCE_RESCALE in f:  # rescale_noise_cfg (Lin et al. 2023, sec. 3.4)
        axes = tuple(range(1, m.ndim))
        ratio = np.std(cond, axis=axes, ddof=1, keepdims=True) / np.std(m, axis=axes, ddof=1, keepdims=True)
        r = f[GUIDANCE_RESCALE][0]
        m = r * m * ratio + (1 - r) * m
    fresh = f[NOISE][min(step, len(f[NOISE]) - 1)]
    stack = np.concatenate([f[STATE], m[None], fresh[None]])
    state = np.tensordot(f[COEFFS][step], stack, axes=1)
    if features.masked:
        signal, scale = f[BLEND][step]
        kept = signal * f[IMAGE_LATENTS] + scale * f[INITIAL_NOISE]
        state[0] = f[MASK] * state[0] + (1 - f[MASK]) * kept
    nxt = min(step + 1, len(f[TIMESTEPS]) - 1)
    sample = f[INPUT_SCALES][nxt] * state[0]
    return {
        STATE_OUT: state,
        SAMPLE_OUT: np.concatenate([sample, sample]) if guided else sample,
        TIMESTEP_OUT: f[TIMESTEPS][nxt : nxt + 1],
        STEP_OUT: np.array([step + 1]),
    }
