"""The tiny latent text-to-image model: its recipe and the five diffusers components it builds."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusion_engine.train.data import SIZE

MAX_TEXT_LENGTH = 77


@dataclass(frozen=True)
class Recipe:
    """Architecture sizes and training settings; the defaults make the committed demo checkpoint."""

    seed: int = 0
    threads: int = 2
    size: int = SIZE
    # Autoencoder: three blocks (scale factor 4), 64x64x3 pixels <-> 16x16x4 latents; no attention,
    # so it is fully convolutional and trains on crops.
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_groups: int = 8
    latent_channels: int = 4
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_init_logvar: float = -6.0
    latent_images: int = 24_000  # images encoded once; the UNet trains on these cached latents
    # Text encoder: a small CLIP transformer over the tiny BPE vocabulary, trained with the UNet.
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # UNet: three levels (16x16, 8x8, 4x4 latents); attention only below 16x16, where it is cheap.
    unet_channels: tuple[int, ...] = (48, 64, 64)
    unet_blocks: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    unet_layers: int = 1
    unet_groups: int = 8  # few groups: GroupNorm keeps more of a flat field's level (the background colour)
    unet_heads: int = 4
    unet_steps: int = 2400
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.995  # a short window: at 0.999 the average still carried the early, much worse weights
    cfg_dropout: float = 0.1  # captions replaced by "" so classifier-free guidance has an unconditional model
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023)
    log_every: int = 50

    def to_json(self) -> dict:
        return asdict(self)


def scheduler_config() -> dict:
    """DDIM with the DDPM linear betas: their terminal SNR is near zero, so pure noise carries no colour."""
    return dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_tokenizer():
    """The tiny CLIP BPE tokenizer of train/tiny.py: every caption word is one token."""
    from transformers import CLIPTokenizer

    from diffusion_engine.train.tiny import tiny_clip_vocab

    vocab, merges = tiny_clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = MAX_TEXT_LENGTH
    return tokenizer


def build_components(recipe: Recipe):
    """Randomly initialised (text_encoder, tokenizer, unet, vae, scheduler) from the recipe's seed."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(recipe.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        max_position_embeddings=MAX_TEXT_LENGTH, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu",
        projection_dim=recipe.text_hidden,
    ))
    blocks = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=recipe.latent_channels, norm_num_groups=recipe.vae_groups,
        block_out_channels=recipe.vae_channels, layers_per_block=1, sample_size=recipe.size,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        mid_block_add_attention=False,
    )
    up_blocks = tuple(b.replace("Down", "Up") for b in reversed(recipe.unet_blocks))
    unet = UNet2DConditionModel(
        sample_size=recipe.size // 2 ** (blocks - 1), in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels, layers_per_block=recipe.unet_layers,
        block_out_channels=recipe.unet_channels, norm_num_groups=recipe.unet_groups,
        down_block_types=recipe.unet_blocks, up_block_types=up_blocks,
        # diffusers reads attention_head_dim as the number of heads (a historical misnomer).
        cross_attention_dim=recipe.text_hidden, attention_head_dim=recipe.unet_heads,
    )
    scheduler = DDIMScheduler(**scheduler_config())
    return text_encoder, tokenizer, unet, vae, scheduler
