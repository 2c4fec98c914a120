"""Original-format (LDM) single-file SD1.x checkpoints load into diffusers with identical weights."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.ldm_format import pipeline_to_ldm, write_ckpt, write_safetensors  # noqa: E402

from diffusion_engine.export.errors import CheckpointError  # noqa: E402
from diffusion_engine.export.single_file import load_single_file  # noqa: E402

WEIGHTED = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny_dir(tiny_checkpoint: Path) -> Path:
    """The tiny SD1.x checkpoint in diffusers format."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def config_only(tiny_dir: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint's configs and tokenizer files, no weights: those can only come from the file."""
    out = tmp_path_factory.mktemp("config_only")
    for src in tiny_dir.rglob("*"):
        if src.is_file() and src.suffix in (".json", ".txt"):
            dst = out / src.relative_to(tiny_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):
    """The tiny pipeline loaded the ordinary diffusers way."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def ldm_state(reference) -> dict:
    """The reference weights in the original LDM key layout."""
    return pipeline_to_ldm(reference)


@pytest.fixture(scope="module")
def single_files(ldm_state: dict, tmp_path_factory) -> dict[str, Path]:
    """The LDM state dict written as .safetensors and as .ckpt."""
    out = tmp_path_factory.mktemp("ldm")
    return {
        "safetensors": write_safetensors(ldm_state, out / "tiny.safetensors"),
        "ckpt": write_ckpt(ldm_state, out / "tiny.ckpt"),
    }


def test_ldm_layout_has_sd1_names(ldm_state: dict) -> None:
    """The converter writes the key names real SD1.x files use; VAE attention weights are 1x1 convs."""
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.time_embed.0.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in ldm_state, key
    assert ldm_state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


@pytest.mark.parametrize("config_kind", ["full_folder", "config_only"])
@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_weights_round_trip_exactly(
    suffix, config_kind, single_files, tiny_dir, config_only, reference
) -> None:
    """Every UNet, VAE and text encoder tensor loaded from the single file equals the original."""
    config = tiny_dir if config_kind == "full_folder" else config_only
    pipe = load_single_file(single_files[suffix], config=config)
    for name in WEIGHTED:
        want, got = getattr(reference, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), f"{name}: {sorted(want.keys() ^ got.keys())[:5]}"
        differing = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
        assert not differing, f"{name}: {differing[:5]}"


def test_scheduler_and_tokenizer_come_through(single_files, config_only, reference) -> None:
    """The scheduler and tokenizer are the config folder's, unchanged."""
    pipe = load_single_file(single_files["safetensors"], config=config_only)
    assert type(pipe.scheduler) is type(reference.scheduler)
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)
    assert pipe.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    prompt = "a photo of a red circle on a blue background"
    assert pipe.tokenizer(prompt).input_ids == reference.tokenizer(prompt).input_ids
    assert pipe.tokenizer.model_max_length == reference.tokenizer.model_max_length
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_missing_file(tmp_path: Path, config_only: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as info:
        load_single_file(path, config=config_only)
    assert str(path) in str(info.value)


def test_wrong_suffix(tmp_path: Path, single_files, config_only: Path) -> None:
    path = tmp_path / "tiny.bin"
    shutil.copy(single_files["ckpt"], path)
    with pytest.raises(CheckpointError, match=r"\.safetensors, \.ckpt") as info:
        load_single_file(path, config=config_only)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_truncated_file(suffix, tmp_path: Path, single_files, config_only: Path) -> None:
    data = single_files[suffix].read_bytes()
    path = tmp_path / f"truncated.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a") as info:
        load_single_file(path, config=config_only)
    assert str(path) in str(info.value)


def test_unrelated_keys(tmp_path: Path, config_only: Path) -> None:
    path = write_safetensors({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not an SD1.x checkpoint") as info:
        load_single_file(path, config=config_only)
    assert str(path) in str(info.value)


def test_ckpt_with_code_is_never_unpickled(tmp_path: Path, config_only: Path) -> None:
    """A .ckpt whose pickle would call a function is refused before anything is unpickled."""
    marker = tmp_path / "unpickled"
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _CallsOnLoad(marker)}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_single_file(path, config=config_only)
    assert not marker.exists()


class _CallsOnLoad:
    """Pickles as a call to Path.touch(marker): a harmless stand-in for code run on unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_no_config_offline_names_config_flag(single_files, tmp_path: Path, monkeypatch) -> None:
    """Without --config and without the hub, the error says to pass a local config folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(CheckpointError, match="--config DIR") as info:
        load_single_file(single_files["safetensors"])
    assert str(single_files["safetensors"]) in str(info.value)


def test_config_without_model_index(single_files, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model_index.json") as info:
        load_single_file(single_files["safetensors"], config=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_config_of_another_architecture(single_files, config_only: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_config"
    shutil.copytree(config_only, other)
    unet_config = other / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    config["block_out_channels"] = [16, 64]
    unet_config.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_single_file(single_files["safetensors"], config=other)


@pytest.mark.parametrize(
    "dropped",
    ["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
)
def test_missing_weights(dropped, ldm_state: dict, tmp_path: Path, config_only: Path) -> None:
    """A file lacking one tensor is an error, never a model with uninitialised weights."""
    partial = {k: v for k, v in ldm_state.items() if k != dropped}
    path = write_safetensors(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="weights") as info:
        load_single_file(path, config=config_only)
    assert str(path) in str(info.value)
