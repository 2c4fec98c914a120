"""Write a diffusers-format SD1.x pipeline as an original (LDM / A1111) single-file checkpoint.

Test utility: the inverse of diffusers' single-file conversion (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), for the layers SD1.x models have.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# Top-level UNet layers: diffusers name -> LDM name.
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Layers inside a UNet ResnetBlock2D: diffusers name -> LDM ResBlock name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Top-level VAE layers whose names differ (the rest keep their names).
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
# VAE mid-block attention: diffusers name -> LDM AttnBlock name; LDM uses 1x1 convs.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _split_layer(rest: str) -> tuple[str, str]:
    """Split 'to_out.0.weight' into ('to_out.0', 'weight')."""
    layer, _, param = rest.rpartition(".")
    return layer, param


def _unet_resnet(rest: str) -> str:
    """Rename the layer inside a UNet resnet block to its LDM name."""
    layer, param = _split_layer(rest)
    if layer not in _UNET_RESNET:
        raise KeyError(f"unknown UNet resnet layer {layer!r}")
    return f"{_UNET_RESNET[layer]}.{param}"


def _unet_block_key(key: str, layers: int, up_attn: set[int]) -> str:
    """LDM name of a key inside a diffusers down/up block (input_blocks / output_blocks)."""
    m = _BLOCK.fullmatch(key)
    if m is None:
        raise KeyError(f"unknown UNet key {key!r}")
    kind, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if kind == "down_blocks":
        first = 1 + block * (layers + 1)
        if part == "downsamplers":
            return f"input_blocks.{first + layers}.0.op.{rest.removeprefix('conv.')}"
        sub = 0 if part == "resnets" else 1
        return f"input_blocks.{first + index}.{sub}.{_unet_resnet(rest) if sub == 0 else rest}"
    first = block * (layers + 1)
    if part == "upsamplers":
        # The upsampler follows the attention when the last layer of the block has one.
        return f"output_blocks.{first + layers}.{2 if block in up_attn else 1}.{rest}"
    sub = 0 if part == "resnets" else 1
    return f"output_blocks.{first + index}.{sub}.{_unet_resnet(rest) if sub == 0 else rest}"


def _unet_key(key: str, layers: int, up_attn: set[int]) -> str:
    """LDM name (without prefix) of one diffusers UNet2DConditionModel key."""
    layer, param = _split_layer(key)
    if layer in _UNET_TOP:
        return f"{_UNET_TOP[layer]}.{param}"
    m = _MID.fullmatch(key)
    if m is not None:
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets":
            return f"middle_block.{2 * index}.{_unet_resnet(rest)}"
        return f"middle_block.1.{rest}"
    return _unet_block_key(key, layers, up_attn)


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """SD1.x UNet state dict in the LDM layout, keys prefixed with model.diffusion_model."""
    last = layers_per_block  # up blocks have layers_per_block + 1 layers
    up_attn = {
        int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and f".attentions.{last}." in k
    }
    return {UNET_PREFIX + _unet_key(k, layers_per_block, up_attn): v for k, v in state.items()}


def _vae_resnet(rest: str) -> str:
    """Rename the layer inside a VAE resnet block (only the shortcut differs)."""
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_attention(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """LDM name and tensor of a VAE attention parameter; linear weights become 1x1 conv weights."""
    layer, param = _split_layer(rest)
    if layer not in _VAE_ATTN:
        raise KeyError(f"unknown VAE attention layer {layer!r}")
    if layer != "group_norm" and param == "weight":
        value = value[:, :, None, None]
    return f"{_VAE_ATTN[layer]}.{param}", value


def _vae_key(key: str, value: torch.Tensor, num_up: int) -> tuple[str, torch.Tensor]:
    """LDM name (without prefix) and tensor of one diffusers AutoencoderKL key."""
    side, _, rest = key.partition(".")
    layer, param = _split_layer(key)
    if layer in _VAE_TOP:
        return f"{_VAE_TOP[layer]}.{param}", value
    if side not in ("encoder", "decoder") or rest.startswith(("conv_in.", "conv_out.")):
        return key, value  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    m = _MID.fullmatch(rest)
    if m is not None:
        if m.group(1) == "resnets":
            return f"{side}.mid.block_{int(m.group(2)) + 1}.{_vae_resnet(m.group(3))}", value
        name, value = _vae_attention(m.group(3), value)
        return f"{side}.mid.attn_1.{name}", value
    m = _BLOCK.fullmatch(rest)
    if m is None:
        raise KeyError(f"unknown VAE key {key!r}")
    block, part, index, tail = int(m.group(2)), m.group(3), m.group(4), m.group(5)
    if m.group(1) == "down_blocks":
        level = f"{side}.down.{block}"
    else:
        level = f"{side}.up.{num_up - 1 - block}"  # LDM numbers decoder levels from low resolution up
    if part == "resnets":
        return f"{level}.block.{index}.{_vae_resnet(tail)}", value
    if part in ("downsamplers", "upsamplers"):
        return f"{level}.{part[:-2]}.{tail}", value  # downsamplers.0.conv -> downsample.conv
    raise KeyError(f"unknown VAE key {key!r}")


def vae_to_ldm(state: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """SD1.x VAE state dict in the LDM layout, keys prefixed with first_stage_model."""
    out = {}
    for key, value in state.items():
        name, value = _vae_key(key, value, num_up_blocks)
        out[VAE_PREFIX + name] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict in the LDM layout (cond_stage_model.transformer.text_model.*)."""
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """All weights of a StableDiffusionPipeline (unet, vae, text encoder) in one LDM state dict."""
    unet = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    vae = vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))
    clip = clip_to_ldm(pipe.text_encoder.state_dict())
    merged = {**unet, **vae, **clip}
    if len(merged) != len(unet) + len(vae) + len(clip):
        raise ValueError("two diffusers keys map to the same LDM key")
    # Own, contiguous storage: safetensors refuses views and shared tensors.
    return {k: v.detach().clone().contiguous() for k, v in merged.items()}


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write an LDM state dict as one .safetensors file."""
    save_file(state, str(path))
    return path


def write_ckpt(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write an LDM state dict as a .ckpt pickle, nested under "state_dict" like Lightning does."""
    torch.save({"state_dict": state}, path)
    return path
