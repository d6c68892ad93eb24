"""`InfDiTPipeline`: the official Inf-DiT super-resolution sampler as a diffusers pipeline.

It reproduces ``generate_t2i_sr.py`` + ``ConcatSRHeunEDMSampler`` in the default ``full`` mode:
centre-crop the LR image to a multiple of ``image_block_size / upscale`` px (the official ``--round 32``),
upsample it bicubically to the HR size and clamp it to [-1, 1], start from that upsampled image plus
sigma_max noise (``--init_noise``), then run EDM's Heun sampler (sigma_min 0.002, sigma_max 40, rho 7,
no churn) whose last step is plain Euler, so 20 steps cost 39 transformer forwards. Each forward is
preconditioned as in EDM (sigma_data 0.5) and runs inside the transformer's ``cache_context``, where a
cache attached with `hicache.apply_cache(..., recipe="inf_dit")` counts one forward as one step.

Differences from the official script, all numerical-precision only: the sampler state is kept in
float32 whatever the transformer dtype (the official script runs everything in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .checkpoint import RELEASED_CONFIG, RELEASED_WEIGHTS_HINT, from_sat_state_dict, load_sat_checkpoint
from .image_encoder import clip_visual_from_sat_state_dict, encode_lr_image
from .transformer import InfDiTTransformer2DModel

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 40.0, 7.0, 0.5


def rho_spaced(ramp: torch.Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = RHO) -> torch.Tensor:
    """Karras et al.'s noise level at ``ramp`` in [0, 1] (0: sigma_max, 1: sigma_min), as the official code."""
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def edm_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
               device=None) -> torch.Tensor:
    """Karras et al.'s rho-spaced noise levels, high to low, with a final 0 (computed as the official code)."""
    sigmas = rho_spaced(torch.linspace(0, 1, num_steps, device=device), sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """c_skip, c_out, c_in, c_noise of EDM for a (B,) sigma."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def _bcast(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, None]


def image_to_tensor(image) -> torch.Tensor:
    """PIL image, list of PIL images or (B, 3, h, w) float tensor in [0, 1] -> (B, 3, h, w) float32 in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, PIL.Image.Image) for i in image):
        sizes = {i.size for i in image}
        if len(sizes) != 1:
            raise ValueError(f"all images of a batch must have the same size, got {sorted(sizes)}")
        arrays = [np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in image]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, h, w), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image tensor must be float in [0, 1], got dtype {image.dtype}")
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"image tensor must be in [0, 1], got values in [{image.min():.3g}, {image.max():.3g}]")
        return image.float()
    raise TypeError(f"image must be a PIL image, a list of PIL images or a (B, 3, h, w) tensor, got {type(image).__name__}")


def center_crop_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crop (B, C, h, w) to the largest multiple of ``multiple`` on each side (torchvision's offsets)."""
    h, w = image.shape[-2:]
    new_h, new_w = h // multiple * multiple, w // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise ValueError(f"the LR image is {h}x{w} px; Inf-DiT needs at least {multiple}x{multiple} px at this upscale")
    top, left = int(round((h - new_h) / 2.0)), int(round((w - new_w) / 2.0))
    return image[..., top : top + new_h, left : left + new_w]


def bicubic_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's tensor resize (bicubic, antialias on), which the official script calls."""
    from torchvision.transforms import v2 as T

    return T.functional.resize(image, list(size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)


class InfDiTPipeline(DiffusionPipeline):
    """Inf-DiT 4x (or 2x) super-resolution with EDM Heun sampling.

    Args:
        transformer: an `InfDiTTransformer2DModel`.
        image_encoder: the OpenCLIP ViT-L/14 visual tower (see `image_encoder.py`), or None if every
            call passes ``image_embeds``.

    The image encoder is an open_clip module, which diffusers cannot serialise: store a pipeline with
    ``python -m hicache.models.inf_dit.convert`` and load it with `from_converted`, not `save_pretrained`.
    """

    model_cpu_offload_seq = "image_encoder->transformer"

    def __init__(self, transformer: InfDiTTransformer2DModel, image_encoder: torch.nn.Module | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, image_encoder=image_encoder)

    @classmethod
    def from_sat_checkpoint(cls, path: str | Path, torch_dtype: torch.dtype | None = None, **config):
        """Transformer and CLIP tower from one official ``mp_rank_00_model_states.pt``."""
        state = load_sat_checkpoint(path)
        cfg = {**RELEASED_CONFIG, **config}
        transformer = InfDiTTransformer2DModel(**cfg)
        transformer.load_state_dict(from_sat_state_dict(state, cfg["num_layers"]), strict=True, assign=True)
        visual = clip_visual_from_sat_state_dict(state)
        if torch_dtype is not None:
            transformer, visual = transformer.to(torch_dtype), visual.to(torch_dtype)
        return cls(transformer=transformer.eval(), image_encoder=visual)

    @classmethod
    def from_converted(cls, path: str | Path, torch_dtype: torch.dtype | None = None):
        """A folder written by ``python -m hicache.models.inf_dit.convert`` (transformer/ and image_encoder/)."""
        from .convert import load_converted_image_encoder

        path = Path(path)
        if not (path / "transformer" / "config.json").is_file():
            raise FileNotFoundError(f"no converted Inf-DiT at {path} (expected {path}/transformer/config.json): "
                                    f"run python -m hicache.models.inf_dit.convert <ckpt> {path}; {RELEASED_WEIGHTS_HINT}")
        transformer = InfDiTTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=torch_dtype)
        visual = load_converted_image_encoder(path / "image_encoder", torch_dtype=torch_dtype)
        return cls(transformer=transformer, image_encoder=visual)

    def prepare_lr(self, image, upscale: int):
        """LR image -> (cropped LR in [-1, 1] at HR/4 for the cross-attention and CLIP, upsampled LR in [-1, 1])."""
        cfg = self.transformer.config
        if upscale not in (2, 4) or cfg.image_block_size % upscale:
            raise ValueError(f"upscale must be 4 (the released model) or 2, got {upscale}")
        lr = image_to_tensor(image) * 2 - 1
        lr = center_crop_to_multiple(lr, cfg.image_block_size // upscale)
        h, w = lr.shape[-2:]
        upsampled = bicubic_resize(lr, (h * upscale, w * upscale)).clamp(-1, 1)
        if upscale != cfg.sr_scale:
            # The network always sees the LR image at HR / sr_scale, as the official script arranges.
            lr = bicubic_resize(lr, (h * upscale // cfg.sr_scale, w * upscale // cfg.sr_scale))
        return lr, upsampled

    def denoise(self, x, sigma, upsampled, lr, image_embeds, step_index, num_forwards, sigma_value: float):
        """EDM's D(x; sigma) = c_skip x + c_out F(c_in [x, upsampled LR]; c_noise), in one cache context
        (``sigma_value``: sigma as a number, from the host's copy of the schedule: reading it off the device would
        wait for the device at every forward)."""
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
        dtype = self.transformer.dtype
        model_input = (torch.cat([x, upsampled], dim=1) * _bcast(c_in)).to(dtype)
        with self.transformer.cache_context("cond", step_index=step_index, num_inference_steps=num_forwards,
                                            sigma=sigma_value):
            out = self.transformer(model_input, c_noise.to(dtype), lr.to(dtype), image_embeds.to(dtype)).sample
        return out.float() * _bcast(c_out) + x * _bcast(c_skip)

    @torch.no_grad()
    def __call__(self, image, num_inference_steps: int = 20, image_embeds: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil", upscale: int = 4, return_dict: bool = True):
        """Super-resolve ``image`` (PIL, list of PIL, or (B, 3, h, w) float tensor in [0, 1]).

        ``latents``: the starting sample (B, 3, upscale*h, upscale*w) after cropping, by default the
        upsampled LR plus sigma_max * N(0, I) drawn from ``generator``. ``output_type``: "pil", "np"
        (float in [0, 1], BHWC) or "pt" (float in [0, 1], BCHW).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = self._execution_device
        lr, upsampled = self.prepare_lr(image, upscale)
        lr, upsampled = lr.to(device), upsampled.to(device)
        batch = lr.shape[0]

        if image_embeds is None:
            if self.image_encoder is None:
                raise ValueError("pass image_embeds (B, vector_dim) or build the pipeline with an image_encoder")
            image_embeds = encode_lr_image(self.image_encoder, lr)
        image_embeds = image_embeds.to(device=device, dtype=torch.float32)
        if tuple(image_embeds.shape) != (batch, self.transformer.config.vector_dim):
            raise ValueError(f"image_embeds must be {(batch, self.transformer.config.vector_dim)}, "
                             f"got {tuple(image_embeds.shape)}")

        sigmas = edm_sigmas(num_inference_steps, device=device)
        # the same levels as numbers, for the loop's branch and the cache context: never read off the device
        sigma_values = [rho_spaced(i / max(num_inference_steps - 1, 1)) for i in range(num_inference_steps)] + [0.0]
        if latents is None:
            noise = torch.randn(upsampled.shape, generator=generator, device=generator.device if generator else "cpu")
            latents = upsampled + noise.to(device) * sigmas[0]
        elif tuple(latents.shape) != tuple(upsampled.shape):
            raise ValueError(f"latents must be {tuple(upsampled.shape)} (the cropped, upsampled size), got {tuple(latents.shape)}")
        x = latents.to(device=device, dtype=torch.float32)

        num_forwards = 2 * num_inference_steps - 1
        forward = 0
        with self.progress_bar(total=num_inference_steps) as progress:
            for i in range(num_inference_steps):
                sigma, next_sigma = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
                denoised = self.denoise(x, sigma, upsampled, lr, image_embeds, forward, num_forwards, sigma_values[i])
                forward += 1
                d = (x - denoised) / _bcast(sigma)
                dt = _bcast(next_sigma - sigma)
                euler = x + dt * d
                if sigma_values[i + 1] < 1e-14:
                    x = euler
                else:
                    denoised = self.denoise(euler, next_sigma, upsampled, lr, image_embeds, forward, num_forwards,
                                            sigma_values[i + 1])
                    forward += 1
                    d_new = (euler - denoised) / _bcast(next_sigma)
                    x = x + (d + d_new) / 2 * dt
                progress.update()
        self.maybe_free_model_hooks()

        if output_type == "pil":
            # The official script truncates (not rounds) to uint8.
            arrays = ((x.double() + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
            images = [PIL.Image.fromarray(a) for a in arrays]
        else:
            images = ((x + 1) / 2).clamp(0, 1)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
