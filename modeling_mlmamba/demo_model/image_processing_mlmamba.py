"""ML-Mamba image processor: one image → one `[3 × towers, H, W]` tensor, each tower normalised its own way.

The original (Prismatic / Cobra "resize-naive") resizes the image once to the towers' square size with bicubic
resampling (PIL, no crop), scales it to [0, 1], then normalises a copy per tower: DINOv2 with the ImageNet mean/std,
SigLIP with 0.5/0.5. The copies are stacked on the channel axis in `vision_config` order, so a batch is one float
tensor `[batch, 3 × towers, H, W]` that `.to(device, dtype)` and the pipelines handle as any `pixel_values`.
"letterbox" (pad to square with each tower's mean colour, then resize) is the original's unused option.

No torchvision: PIL does the resampling, numpy the arithmetic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from .transformers_compat import TRANSFORMERS_RELEASE  # noqa: F401  first: checks the installed transformers release

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature  # noqa: E402


# Per-tower normalisation by tower type (the pretrained towers' own preprocessing).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TOWER_NORMALIZATION = {
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
}
RESIZE_STRATEGIES = ("resize-naive", "letterbox")


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"file {os.fspath(image)!r}"
    return f"a {type(image).__module__}.{type(image).__name__}"


def load_image_file(path: str | os.PathLike) -> PIL.Image.Image:
    """Opens an image file fully (so a truncated file fails here, naming the file)."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        from transformers.image_utils import load_image

        return load_image(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            # EXIF orientation is read while the file is open: a copy may no longer carry the raw EXIF block.
            return PIL.ImageOps.exif_transpose(image)
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image file {path!r}: it is corrupt or not an image ({err})") from err


def to_rgb_pil_or_array(image: Any) -> PIL.Image.Image | np.ndarray:
    """Any accepted image → an upright RGB PIL image (8-bit inputs) or a float32 HWC array in [0, 1] (float inputs).

    Accepted: PIL images, file paths (`str` / `Path`), numpy arrays and torch tensors (HW, HWC or CHW; uint8 in
    [0, 255] or float in [0, 1]). EXIF orientation is applied; RGBA, palette and grayscale become RGB (alpha dropped,
    as the original's `Image.convert("RGB")` does).
    """
    if isinstance(image, (str, Path)):
        image = load_image_file(image)
    if isinstance(image, PIL.Image.Image):
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit grayscale: scale to 8 bits instead of letting convert() clip at 255
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
            image = PIL.Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB") if image.mode != "RGB" else image

    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"Expected an image (PIL.Image, file path, numpy array or torch tensor), got {_describe(image)}"
        )
    array = image
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"Expected an image array of shape (H, W), (H, W, C) or (C, H, W), got shape {array.shape}")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW → HWC
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected 1, 3 or 4 channels, got an array of shape {image.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"Expected a uint8 or float image array, got dtype {array.dtype}")
    array = array.astype(np.float32)
    if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
        raise ValueError(
            f"Float image arrays must hold values in [0, 1] (got min {array.min():.3f}, max {array.max():.3f}); "
            "pass uint8 arrays for [0, 255] data"
        )
    return np.clip(array, 0.0, 1.0)


def _resize(image: PIL.Image.Image | np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize to (height, width) with PIL → float32 HWC in [0, 1]. Float inputs are resized channel by channel."""
    height, width = size
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.resize((width, height), resample=resample), dtype=np.float32) / 255.0
    channels = [
        np.asarray(PIL.Image.fromarray(image[..., c], mode="F").resize((width, height), resample=resample))
        for c in range(image.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def _letterbox(image: PIL.Image.Image | np.ndarray, fill: tuple[float, float, float]) -> PIL.Image.Image | np.ndarray:
    """Pad to (almost) square with `fill` (in [0, 1]), as the original's `LetterboxPad`: floor((max - side) / 2) each side."""
    if isinstance(image, PIL.Image.Image):
        w, h = image.size
    else:
        h, w = image.shape[:2]
    side = max(w, h)
    pad_w, pad_h = (side - w) // 2, (side - h) // 2
    if isinstance(image, PIL.Image.Image):
        canvas = PIL.Image.new("RGB", (w + 2 * pad_w, h + 2 * pad_h), tuple(int(x * 255) for x in fill))
        canvas.paste(image, (pad_w, pad_h))
        return canvas
    canvas = np.empty((h + 2 * pad_h, w + 2 * pad_w, 3), dtype=np.float32)
    canvas[:] = np.asarray([int(x * 255) / 255.0 for x in fill], dtype=np.float32)
    canvas[pad_h : pad_h + h, pad_w : pad_w + w] = image
    return canvas


def _resize_shortest_and_center_crop(image, size: tuple[int, int], resample: int) -> np.ndarray:
    """timm's default eval transform at crop_pct 1: shortest side → size, then center crop."""
    height, width = size
    if isinstance(image, PIL.Image.Image):
        w, h = image.size
    else:
        h, w = image.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = _resize(image, (new_h, new_w), resample)
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    return resized[top : top + height, left : left + width]


class MLMambaImageProcessor(BaseImageProcessor):
    r"""
    Preprocesses images for ML-Mamba's vision towers.

    Args:
        size (`dict`, *optional*, defaults to `{"height": 384, "width": 384}`): the towers' input size.
        resample (`int`, *optional*, defaults to `PIL.Image.BICUBIC` (3)): PIL resampling filter.
        image_resize_strategy (`str`, *optional*, defaults to `"resize-naive"`):
            `"resize-naive"` (resize to `size`, no crop: the released model) or `"letterbox"` (pad to square with each
            tower's mean colour, resize the shortest side, center crop).
        image_mean, image_std (`list[list[float]]`, *optional*):
            One RGB triple per tower, in `vision_config` order. Default: DINOv2 (ImageNet) then SigLIP (0.5).
        rescale_factor (`float`, *optional*, defaults to 1/255): scales 8-bit pixels to [0, 1].

    Output: `pixel_values` of shape `[num_images, 3 × towers, H, W]`, float32.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | int | None = None,
        resample: int = PIL.Image.BICUBIC,
        image_resize_strategy: str = "resize-naive",
        image_mean: list | None = None,
        image_std: list | None = None,
        rescale_factor: float = 1 / 255,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        if size is None:
            size = {"height": 384, "width": 384}
        elif isinstance(size, int):
            size = {"height": size, "width": size}
        self.size = {"height": int(size["height"]), "width": int(size["width"])}
        self.resample = int(resample)
        if image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(
                f"Unknown image_resize_strategy {image_resize_strategy!r}; expected one of {list(RESIZE_STRATEGIES)}"
            )
        self.image_resize_strategy = image_resize_strategy
        image_mean = [IMAGENET_MEAN, SIGLIP_MEAN] if image_mean is None else image_mean
        image_std = [IMAGENET_STD, SIGLIP_STD] if image_std is None else image_std
        # A single triple means one tower.
        if len(image_mean) == 3 and not isinstance(image_mean[0], (list, tuple)):
            image_mean = [image_mean]
        if len(image_std) == 3 and not isinstance(image_std[0], (list, tuple)):
            image_std = [image_std]
        self.image_mean = [[float(v) for v in m] for m in image_mean]
        self.image_std = [[float(v) for v in s] for s in image_std]
        if len(self.image_mean) != len(self.image_std) or any(len(t) != 3 for t in self.image_mean + self.image_std):
            raise ValueError(
                f"image_mean and image_std must be one RGB triple per tower; got {len(self.image_mean)} means "
                f"{self.image_mean} and {len(self.image_std)} stds {self.image_std}"
            )
        self.rescale_factor = float(rescale_factor)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "MLMambaImageProcessor":
        """The image processor an `MLMambaConfig` expects: its towers' size and each tower's normalisation."""
        means, stds = [], []
        for i, tower in enumerate(config.vision_config):
            if tower.model_type not in TOWER_NORMALIZATION:
                raise ValueError(
                    f"No known normalisation for vision_config[{i}] of type {tower.model_type!r}; "
                    f"expected one of {list(TOWER_NORMALIZATION)}"
                )
            mean, std = TOWER_NORMALIZATION[tower.model_type]
            means.append(list(mean))
            stds.append(list(std))
        size = {"height": config.image_size, "width": config.image_size}
        return cls(size=size, image_mean=means, image_std=stds, **kwargs)

    @property
    def num_towers(self) -> int:
        return len(self.image_mean)

    def fetch_images(self, image_url_or_urls):
        # Paths are opened in `preprocess` (with errors naming the file); anything else passes through untouched.
        return image_url_or_urls

    def process_one(self, image: Any, strategy: str | None = None) -> np.ndarray:
        """One image → float32 `[3 × towers, H, W]`."""
        strategy = strategy or self.image_resize_strategy
        size = (self.size["height"], self.size["width"])
        image = to_rgb_pil_or_array(image)
        if strategy == "resize-naive":
            pixels = _resize(image, size, self.resample)  # (H, W, 3) in [0, 1]
            per_tower = [pixels] * self.num_towers
        elif strategy == "letterbox":
            per_tower = [
                _resize_shortest_and_center_crop(_letterbox(image, tuple(mean)), size, self.resample)
                for mean in self.image_mean
            ]
        else:
            raise ValueError(f"Unknown image_resize_strategy {strategy!r}; expected one of {list(RESIZE_STRATEGIES)}")
        # (x - mean) / std per tower and channel, on contiguous planes (3× faster than broadcasting over HWC)
        height, width = per_tower[0].shape[:2]
        out = np.empty((3 * len(per_tower), height, width), dtype=np.float32)
        for t, (pixels, mean, std) in enumerate(zip(per_tower, self.image_mean, self.image_std)):
            planes = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
            for c in range(3):
                plane = out[3 * t + c]
                np.subtract(planes[c], np.float32(mean[c]), out=plane)
                np.divide(plane, np.float32(std[c]), out=plane)
        return out

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        image_resize_strategy: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        images: one image or a (possibly nested) list of images: PIL, numpy, torch, or file paths.
        Returns `BatchFeature({"pixel_values": [num_images, 3 × towers, H, W]})` (a torch tensor by default).
        """
        flat = flatten_images(images)
        if not flat:
            raise ValueError("No images were given to the image processor")
        pixel_values = np.stack([self.process_one(image, image_resize_strategy) for image in flat])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def is_single_image(image: Any) -> bool:
    if isinstance(image, (PIL.Image.Image, str, Path)):
        return True
    return hasattr(image, "ndim") and hasattr(image, "shape")


def flatten_images(images: Any) -> list:
    """A single image, a list of images or a list of lists of images → a flat list, in order."""
    if images is None:
        return []
    if is_single_image(images):
        return [images]
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]  # not an image: `to_rgb_pil_or_array` will say so


MLMambaImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["MLMambaImageProcessor"]
