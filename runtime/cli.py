"""`engine-run --engine DIR --prompt TEXT`: generate PNGs from an engine directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from PIL import PngImagePlugin
from tqdm import tqdm

from diffusion_engine.engine.atomic import check_output_file, run_cli, write_atomic
from diffusion_engine.engine.manifest import ManifestError
from diffusion_engine.engine.specs import FAMILY_DEFAULTS, REFINER_FAMILY
from diffusion_engine.runtime import demo
from diffusion_engine.runtime.backends import BACKENDS
from diffusion_engine.runtime.infotext import infotext, model_identity, per_image
from diffusion_engine.runtime.pipeline import (
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    REFINER_START,
    GenerationResult,
    Pipeline,
)
from diffusion_engine.runtime.request import DEFAULT_STRENGTH, INPAINT_STRENGTH, RESIZE_MODES
from diffusion_engine.runtime.samplers import SAMPLERS
from diffusion_engine.runtime.serve.codec import PARAMETERS_CHUNK
from diffusion_engine.runtime.session import BackendUnavailable


DEMO_HELP = (
    f"Without --engine, engine-run uses the built-in demo model: {demo.DESCRIPTION}; 64x64 by default. "
    f"Its first use exports it (needs diffusion-engine[export]) into ${demo.CACHE_ENV}/demo-<digest>, by "
    f"default {demo.DEFAULT_CACHE}/demo-<digest>; later runs reuse it. To clear the cache, delete that folder."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engine-run", description="Generate images from an engine directory.", epilog=DEMO_HELP)
    p.add_argument("--engine", help="engine directory made by engine-export (default: the built-in demo model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, help="default: the model family's (manifest defaults)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 disables it (default: the family's)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="rescale the guided output (Lin et al. 2023), 0..1")
    p.add_argument("--scheduler", choices=SAMPLERS, help="default: the checkpoint's own scheduler")
    p.add_argument("--seed", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int, default=1, help="images to generate")
    p.add_argument("--image", help="img2img: start from this picture (its size is the default size)")
    p.add_argument("--strength", type=float,
                   help=f"img2img: how much of the schedule reruns, in (0, 1] (default {DEFAULT_STRENGTH}, the SDXL "
                        f"refiner's {FAMILY_DEFAULTS[REFINER_FAMILY].strength}; {INPAINT_STRENGTH} with --mask)")
    p.add_argument("--mask", help="inpainting: repaint where this grayscale picture (the --image's size) is white, "
                                  "keep where it is black")
    p.add_argument("--no-keep-unmasked", action="store_true",
                   help="inpainting: return the decoded image as is (default: paste the --image's own pixels back "
                        "outside the mask)")
    p.add_argument("--refiner", metavar="DIR",
                   help="an sdxl-refiner engine: the --engine (an SDXL base) hands its latents over at --refiner-start "
                        "and the refiner denoises the rest")
    p.add_argument("--refiner-start", type=float,
                   help=f"with --refiner: the fraction of the schedule the base runs, in (0, 1) (default {REFINER_START})")
    p.add_argument("--aesthetic-score", type=float,
                   help=f"SDXL refiner: the aesthetic score it conditions on (default {AESTHETIC_SCORE})")
    p.add_argument("--negative-aesthetic-score", type=float,
                   help=f"SDXL refiner: the unconditional rows' aesthetic score (default {NEGATIVE_AESTHETIC_SCORE})")
    p.add_argument("--resize-mode", choices=RESIZE_MODES,
                   help="img2img: fit an --image (and --mask) of another size than --height x --width (default: refuse)")
    p.add_argument("--tiny-vae", action="store_true",
                   help="decode with the engine's tiny autoencoder (TAESD / TAESDXL; engine-export --tiny-vae PATH) "
                        "instead of the checkpoint's VAE")
    p.add_argument("--out", default="out.png", help="PNG path; with --batch N > 1, -0, -1, ... are added")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: trt with a GPU, TensorRT and built plans, else ort-cuda, else ort-cpu")
    p.add_argument("--no-cuda-graph", action="store_true", help="trt: run every step eagerly (no CUDA graph capture)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def output_paths(out: str, n: int) -> list[Path]:
    """out itself for one image; out-<i>.png for several; each checked writable before any model runs."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out!r} must end in .png")
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]
    for p in paths:
        try:
            check_output_file(p)
        except OSError as exc:
            raise ValueError(f"--out {exc}") from exc
    return paths


def save_png(result: GenerationResult, index: int, path: Path, model: tuple[str | None, str | None] = (None, None)) -> None:
    """Write one image with A1111's `parameters` text (what its PNG Info tab reads) and our parameters as JSON
    (chunk 'diffusion-engine'); `model`: (name, short hash) as model_identity gives them."""
    info = PngImagePlugin.PngInfo()
    image = per_image(result.parameters, len(result.images))[index]
    info.add_text("parameters", infotext(image, *model))
    info.add_text(PARAMETERS_CHUNK, json.dumps({**result.parameters, "index": index}))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, writer=lambda tmp: result.images[index].save(tmp, format="PNG", pnginfo=info))


def demo_engine() -> Path:
    """The built-in demo model's engine, exported into the cache on first use."""
    model = demo.ensure_engine(say=lambda message: print(message, file=sys.stderr))
    print(f"using the built-in demo model ({demo.DESCRIPTION}); engine {model.engine_dir}")
    return model.engine_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("engine-run", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusion_engine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        paths = output_paths(args.out, args.batch)
        if args.refiner_start is not None and args.refiner is None:
            raise ValueError("--refiner-start applies with --refiner DIR")
        engine = args.engine or demo_engine()
        with contextlib.ExitStack() as stack:
            pipe = stack.enter_context(Pipeline.load(engine, backend=args.backend, cuda_graphs=not args.no_cuda_graph))
            refiner = None if args.refiner is None else stack.enter_context(
                Pipeline.load(args.refiner, backend=args.backend, cuda_graphs=not args.no_cuda_graph))
            bar = stack.enter_context(StepBar())
            result = pipe.generate(
                args.prompt, args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
                scheduler=args.scheduler, seed=args.seed, height=args.height, width=args.width,
                batch_size=args.batch, progress=bar.update, guidance_rescale=args.guidance_rescale,
                image=args.image, strength=args.strength, resize_mode=args.resize_mode, mask=args.mask,
                keep_unmasked=not args.no_keep_unmasked, refiner=refiner, refiner_start=args.refiner_start,
                aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
                decoder="tiny" if args.tiny_vae else "full",
            )
    except (ValueError, ManifestError, demo.DemoError, BackendUnavailable) as exc:
        print(f"engine-run: error: {exc}", file=sys.stderr)
        return 2
    model = model_identity(pipe.manifest.source)
    for i, path in enumerate(paths):
        try:
            save_png(result, i, path, model)
        except OSError as exc:  # checked before generating; a full disk or a folder removed since shows here
            print(f"engine-run: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    p = result.parameters
    print(f"{p['width']}x{p['height']}, {p['steps']} steps of {p['scheduler']}, guidance {p['guidance_scale']}, "
          f"seed {result.seed}, backend {p['backend']}, {p['decoder']} decoder")
    print("  ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.timings.items()))
    return 0


class StepBar:
    """A tqdm bar of UNet evaluations, opened at the first report (when the total is known: no empty `0step` bar)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="step", file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
