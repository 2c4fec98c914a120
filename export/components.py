"""PyTorch wrappers of the text encoder, UNet, VAE decoder and encoder, and their spec-driven ONNX export."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import torch

from diffusion_engine.engine.atomic import current_umask
from diffusion_engine.engine.specs import (
    MASK,
    MASKED_IMAGE_LATENTS,
    TEXT_EMBEDS,
    TEXT_ENCODER,
    TIME_IDS,
    TIMESTEP,
    TIMESTEP_COND,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    AxisRange,
    ComponentSpec,
    component_specs,
)

logger = logging.getLogger(__name__)

OPSET = 20  # what the dynamo exporter emits by default; the TensorRT 10 ONNX parser reads it
EXTERNAL_DATA_BYTES = 1 << 30  # above this many weight bytes a graph's weights go to a .data file


class TextEncoder(torch.nn.Module):
    """CLIP text encoder: int32 token ids -> last hidden state."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), return_dict=False)[0]


class SdxlTextEncoders(torch.nn.Module):
    """SDXL's two CLIP encoders as diffusers' encode_prompt uses them, in one graph.

    (input_ids, input_ids_2) -> (penultimate hidden states of both, concatenated; the second's
    pooled projection).
    """

    def __init__(self, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.text_encoder(input_ids.long(), output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2.long(), output_hidden_states=True)
        prompt_embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return prompt_embeds, second.text_embeds


class PooledTextEncoder(torch.nn.Module):
    """The SDXL refiner's one OpenCLIP encoder as diffusers' encode_prompt uses it (SDXL's second encoder
    alone): input_ids -> (penultimate hidden states, pooled projection)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.long(), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class UNet(torch.nn.Module):
    """Conditional UNet: (sample, timestep[1], encoder_hidden_states, *conditioning) -> noise prediction.

    `conditioning` are the spec's extra inputs, by name: SDXL's text_embeds and time_ids (the added
    embedding), LCM's timestep_cond (the guidance embedding), an inpainting UNet's mask and
    masked-image latents (joined to the sample along channels, as diffusers' inpaint pipelines do).
    """

    def __init__(self, unet: torch.nn.Module, conditioning: tuple[str, ...] = ()):
        super().__init__()
        self.unet = unet
        self.conditioning = conditioning

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        *conditioning: torch.Tensor,
    ) -> torch.Tensor:
        named = dict(zip(self.conditioning, conditioning))
        added = {k: named[k] for k in (TEXT_EMBEDS, TIME_IDS) if k in named}
        if MASK in named:
            sample = torch.cat([sample, named[MASK], named[MASKED_IMAGE_LATENTS]], dim=1)
        return self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=named.get(TIMESTEP_COND),
            added_cond_kwargs=added or None, return_dict=False,
        )[0]


class VaeDecoder(torch.nn.Module):
    """VAE decoder with the pipeline's pre/post-processing: latents -> uint8 NHWC pixels."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        c = vae.config
        # Latents to the VAE's own space: x / scaling_factor + shift, or per channel x * std / scaling_factor
        # + mean where the VAE has latent statistics (as diffusers' SDXL pipeline decodes).
        self.scale: float | torch.Tensor = 1.0 / c.scaling_factor
        self.shift: float | torch.Tensor = getattr(c, "shift_factor", None) or 0.0
        if getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
            self.scale = torch.tensor(c.latents_std).view(1, -1, 1, 1) / c.scaling_factor
            self.shift = torch.tensor(c.latents_mean).view(1, -1, 1, 1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents * self.scale + self.shift, return_dict=False)[0]
        x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
        # The cast is the last op: TensorRT allows UINT8 only as a network input or output.
        return x.to(torch.uint8)


class VaeEncoder(torch.nn.Module):
    """VAE encoder with the pipeline's pre-processing: uint8 NHWC pixels -> the posterior's mean and std
    in the UNet's latent space (the decoder's scaling inverted), so a sample is mean + std * eps."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        decoder = VaeDecoder(vae)  # one definition of the latent scaling
        self.scale, self.shift = decoder.scale, decoder.shift

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The cast is the first op: TensorRT allows UINT8 only as a network input or output.
        x = images.to(torch.float32).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0  # VaeImageProcessor's normalisation
        posterior = self.vae.encode(x, return_dict=False)[0]
        return (posterior.mean - self.shift) / self.scale, posterior.std / self.scale


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters a wrapper's graph holds: a VAE half counts only its own half (both hold the whole VAE)."""
    vae = getattr(module, "vae", None)
    if isinstance(module, (VaeDecoder, VaeEncoder)) and vae is not None:
        parts = ("decoder", "post_quant_conv") if isinstance(module, VaeDecoder) else ("encoder", "quant_conv")
        module = torch.nn.ModuleList([getattr(vae, p) for p in parts if getattr(vae, p, None) is not None])
    return sum(p.numel() for p in module.parameters())


def wrap(name: str, pipe: Any) -> torch.nn.Module:
    """The export wrapper of one component of a diffusers pipeline, in eval mode, fp32."""
    from diffusion_engine.export.checkpoint import model_dims

    spec = component_specs(model_dims(pipe))[name]
    first, second = pipe.text_encoder, getattr(pipe, "text_encoder_2", None)

    def text_encoder() -> torch.nn.Module:
        if second is None:
            return TextEncoder(first)
        return PooledTextEncoder(second) if first is None else SdxlTextEncoders(first, second)

    modules = {
        TEXT_ENCODER: text_encoder,
        UNET: lambda: UNet(pipe.unet, tuple(t.name for t in spec.inputs[3:])),
        VAE_DECODER: lambda: VaeDecoder(pipe.vae),
        VAE_ENCODER: lambda: VaeEncoder(pipe.vae),
    }
    return modules[name]().eval().float()


def example_feeds(spec: ComponentSpec, dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the spec's shapes: token ids in the vocabulary, timesteps in [0, 1000)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = t.shape(dims)
        if t.dtype == "int32":
            feeds[t.name] = rng.integers(0, dims.get("vocab_size", 256), size=shape, dtype=np.int32)
        elif t.dtype == "uint8":  # pixels
            feeds[t.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif t.name == MASK:  # 1 = repaint, 0 = keep
            feeds[t.name] = (rng.random(shape) < 0.5).astype(np.float32)
        elif t.name in (TIMESTEP, TIME_IDS):  # timesteps in [0, 1000); sizes and crops of that order
            feeds[t.name] = rng.uniform(0, 1000, size=shape).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def export_dims(ranges: Mapping[str, AxisRange], batch: int = 2) -> dict[str, int]:
    """Trace-time axis values: batch >= 2 and pairwise distinct so no axis is specialised.

    An axis whose range is one value (batch 1 without guidance) is static: it takes that value. A
    multiple-of axis is traced at 2 x its multiple or more: traced at 1 x, torch.export would fix its
    quotient to 1 (its 0/1 specialisation) and refuse the range (e.g. --min-size at the size granule).
    """
    dims: dict[str, int] = {}
    used = {batch}
    for axis, r in ranges.items():
        if axis == "batch":
            dims[axis] = min(batch, r.max)
            continue
        value = r.max if axis == "sequence" else r.min
        if r.multiple > 1 and value < 2 * r.multiple <= r.max:
            value = 2 * r.multiple
        while value in used and value + r.multiple <= r.max:
            value += r.multiple
        dims[axis] = value
        used.add(value)
    return dims


def _dynamic_shapes(spec: ComponentSpec, ranges: Mapping[str, AxisRange], module: torch.nn.Module) -> dict[str, Any]:
    """torch.export's dynamic shapes keyed by the wrapper's parameters (a *varargs one takes a tuple)."""
    dim_objs: dict[str, Any] = {}
    for axis, r in ranges.items():
        if r.min == r.max:
            continue  # one value: a static axis (torch.export has no single-valued Dim)
        if r.multiple > 1:
            base = torch.export.Dim(f"{axis}_div", min=math.ceil(r.min / r.multiple), max=r.max // r.multiple)
            dim_objs[axis] = r.multiple * base
        else:
            dim_objs[axis] = torch.export.Dim(axis, min=r.min, max=r.max)
    per_input = [{i: dim_objs[a] for i, a in t.dynamic_axes().items() if a in dim_objs} for t in spec.inputs]
    shapes: dict[str, Any] = {}
    for k, param in enumerate(inspect.signature(module.forward).parameters.values()):
        if param.kind is param.VAR_POSITIONAL:
            if per_input[k:]:  # torch.export wants no key for empty varargs
                shapes[param.name] = tuple(per_input[k:])
            break
        shapes[param.name] = per_input[k]
    return shapes


def export_component(
    module: torch.nn.Module, spec: ComponentSpec, ranges: Mapping[str, AxisRange], path: Path, vocab_size: int = 256
) -> onnx.ModelProto:
    """Trace one component with torch.onnx (dynamo exporter) and save it with spec axis names."""
    dims = {**export_dims(ranges), "vocab_size": vocab_size}
    feeds = example_feeds(spec, dims)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    log = io.StringIO()  # the exporter prints its progress to stdout; keep it for debugging only
    with torch.no_grad(), contextlib.redirect_stdout(log):
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_dynamic_shapes(spec, ranges, module),
        )
    logger.debug("torch.onnx output for %s:\n%s", spec.name, log.getvalue())
    if ir_weight_bytes(program.model) <= EXTERNAL_DATA_BYTES:
        model = program.model_proto
        name_axes(model, spec)
        shapes_from_cast(model)
        save_model(model, path)
        return model
    return save_streamed(program.model, path, lambda model: (name_axes(model, spec), shapes_from_cast(model)))


def ir_weight_bytes(model: Any) -> int:
    """Bytes of an onnx_ir model's initializers (the exporter's model, before any proto is made)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_streamed(model: Any, path: Path, edit: Callable[[onnx.ModelProto], Any]) -> onnx.ModelProto:
    """Save the exporter's onnx_ir model with its weights in `<name>.data`, one tensor at a time.

    `program.model_proto` would hold a second full copy of the weights next to the module's (10 GB for
    SDXL's UNet); onnx_ir writes each tensor to the data file as it goes. `edit` then changes the graph
    (loaded without its weights) before it is saved. Both files get temporary names until complete.
    Returns the graph without its weights (its initializers point into the data file).
    """
    import onnx_ir as ir

    path = Path(path)
    data, tmp = path.with_name(f"{path.name}.data"), path.with_name(f".{path.name}.tmp")
    tmp_data = path.with_name(f".{data.name}.tmp")
    ir.save(model, tmp, external_data=tmp_data.name)
    graph = onnx.load(str(tmp), load_external_data=False)
    edit(graph)
    for init in graph.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = data.name
    os.chmod(tmp_data, 0o666 & ~current_umask())
    onnx.save_model(graph, tmp)
    tmp_data.replace(data)
    tmp.replace(path)
    return graph


def shapes_from_cast(model: onnx.ModelProto) -> None:
    """Shape/Size nodes of a UINT8 graph input read its first Cast instead, which goes first in the graph.

    TensorRT allows UINT8 only as a network input or output (so only a Cast may read it); the shape of
    the cast tensor is the same, and the Cast needs nothing but the input, so it may run first.
    """
    nodes = list(model.graph.node)
    for value in model.graph.input:
        if value.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            continue
        cast = next((n for n in nodes if n.op_type == "Cast" and n.input[0] == value.name), None)
        if cast is None:
            continue
        for node in nodes:
            if node.op_type in ("Shape", "Size") and node.input[0] == value.name:
                node.input[0] = cast.output[0]
        nodes.remove(cast)
        nodes.insert(0, cast)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def name_axes(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give graph inputs/outputs the spec's axis names; drop stale intermediate shape info."""
    for value in list(model.graph.input) + list(model.graph.output):
        t = spec.tensor(value.name)
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(t.axes):
            raise ValueError(f"{spec.name}.{t.name}: exported rank {len(dims)}, spec rank {len(t.axes)}")
        for d, axis in zip(dims, t.axes):
            if isinstance(axis, str):
                d.dim_param = axis
            else:
                d.dim_value = axis
    del model.graph.value_info[:]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (raw or typed data), without serialising the model."""
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.raw_data else np.prod(init.dims, dtype=np.int64) * 4
    return int(total)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save a graph; weights above EXTERNAL_DATA_BYTES go to `<name>.data` beside it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        # The external data file was written beside the temp name under its final name; onnx creates it
        # 0600: give it the permissions the umask gives, as every other file of the engine. (No file
        # where every tensor is under the size threshold.)
        data = path.with_name(f"{path.name}.data")
        if data.exists():
            os.chmod(data, 0o666 & ~current_umask())
    else:
        onnx.save_model(model, tmp)
    tmp.replace(path)
