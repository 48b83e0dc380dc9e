"""Image bytes to ``uint8 [C, H, W]`` tensors, on the CPU (Pillow) or in batches on a CUDA device (nvJPEG).

:func:`decode` is the one CPU decoder of the project. It applies the EXIF orientation, converts CMYK, palette and
grayscale images to the run's channels, scales 16-bit (and 32-bit, float) greyscale to 8 bits instead of
clipping it, composites images with an alpha channel over white, and can decode a
JPEG at 1/2, 1/4 or 1/8 of its size with the JPEG DCT-scaling mode (``reduce``), which costs a fraction of a full
decode. :func:`reduction` says how far an image may be reduced for a set of crop boxes and an output size.
:func:`decode_jpegs_cuda` decodes a batch of JPEGs on the GPU with torchvision (``runtime.gpu_decode``).

A file that is not an image, or a truncated one, is a :class:`~ddpipe.errors.DataError` naming it.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from ddpipe.errors import DataError, first_line

ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def open_image(data: bytes, name):
    """The Pillow image of ``data`` with only its header read. ``name`` (for messages) may be a function that
    returns it."""
    from PIL import Image, UnidentifiedImageError

    name = _Name(name)
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DataError(f"image {name} is too large to decode: {first_line(e)}") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {name} (not an image, or a format Pillow does not know)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {name} ({e.__class__.__name__}: {first_line(e)})") from None


def oriented_size(im) -> tuple[int, int]:
    """(height, width) of the image as shown, i.e. after its EXIF orientation."""
    w, h = im.size
    try:
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the image is shown as stored
        orientation = 1
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def reduction(boxes: torch.Tensor, size: int | tuple[int, int], limit: int = 8) -> int:
    """The largest JPEG reduction (1, 2, 4 or 8, at most ``limit``) that leaves every box ([K, 4] top, left, h, w
    in full-size pixels) at least ``size`` pixels on each side, so that crops resized to ``size`` lose nothing."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    side = min(float(boxes[:, 2].min()) / out_h, float(boxes[:, 3].min()) / out_w) if len(boxes) else 1.0
    r = 1
    while r * 2 <= min(side, limit):
        r *= 2
    return r


def decode(data: bytes, channels: int, name, reduce=1, size: int | None = None) -> tuple[torch.Tensor, float]:
    """``data`` as uint8 [channels, H, W] and the scale of the result against the full-size image (1.0, or about
    1/``reduce`` when a JPEG was decoded with DCT scaling). ``reduce`` may be a function of the full (height,
    width) as shown, called before decoding. With ``size``, the image is resized (shorter side to ``size``,
    Pillow's antialiased bilinear on uint8) and centre-cropped to ``size`` x ``size`` on the way: as
    :func:`ddpipe.data.resize_center` does for tensors, at a fraction of its cost on large images."""
    from PIL import Image

    name = _Name(name)
    im, scale = _shown(data, channels, name, reduce)
    try:
        if size is not None and im.size != (size, size):
            w, h = im.size
            nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
        return _tensor(np.asarray(im, dtype=np.uint8)), scale
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {name} ({e.__class__.__name__}: {first_line(e)})") from None


def decode_crops(data: bytes, channels: int, name, make_boxes, size: int | tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``make_boxes(height, width)`` (int64 [K, 4] top, left, h, w in the full-size image as shown) and the
    uint8 crops [K, channels, *size] they cut, each resized by Pillow straight from its box (antialiased bilinear
    on uint8, the box in sub-pixel coordinates). The JPEG is decoded at the smallest DCT scale that keeps every
    box at least ``size`` (:func:`reduction`): a crop costs a fraction of cutting it from a float tensor."""
    from PIL import Image

    out_h, out_w = (size, size) if isinstance(size, int) else size
    made = []

    def reduce(h, w):
        made.append((h, w, make_boxes(h, w)))
        return reduction(made[0][2], size)

    name = _Name(name)
    im, _ = _shown(data, channels, name, reduce)
    full_h, full_w, boxes = made[0]
    sx, sy = im.width / full_w, im.height / full_h  # per axis: DCT scaling rounds each side up

    def box(top, left, h, w):
        return left * sx, top * sy, min((left + w) * sx, im.width), min((top + h) * sy, im.height)

    try:
        crops = [np.asarray(im.resize((out_w, out_h), Image.BILINEAR, box=box(*b)), dtype=np.uint8)
                 for b in boxes.tolist()]
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {name} ({e.__class__.__name__}: {first_line(e)})") from None
    if not crops:
        return boxes, torch.zeros(0, channels, out_h, out_w, dtype=torch.uint8)
    return boxes, torch.stack([_tensor(c) for c in crops])


def _shown(data: bytes, channels: int, name: _Name, reduce):
    """The decoded Pillow image as shown (EXIF orientation applied) in the run's mode ("L" or "RGB"; alpha over
    white), and its scale against the full size."""
    from PIL import Image, ImageOps

    im = open_image(data, name)
    if callable(reduce):
        reduce = reduce(*oriented_size(im))
    try:
        full_w, full_h = im.size
        if reduce > 1 and im.format == "JPEG":
            im.draft(im.mode if im.mode in ("RGB", "L") else None, (max(1, full_w // reduce), max(1, full_h // reduce)))
        im.load()
        scale = im.size[0] / full_w
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I") or im.mode == "F":
            im = _eight_bit(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return im.convert("L" if channels == 1 else "RGB"), scale
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {name} ({e.__class__.__name__}: {first_line(e)})") from None


def _eight_bit(im):
    """A 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) greyscale image as 8-bit ``L``, scaled rather
    than clipped: 16-bit values by 255/65535 (``I`` holds them too: Pillow opens some 16-bit files so), floats from
    [0, 1] when they lie in it, else as 8-bit values."""
    from PIL import Image

    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        scaled = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
    else:
        scaled = arr.astype(np.float64) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8), mode="L")


def _tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_jpegs_cuda(datas: list[bytes], device) -> list[torch.Tensor]:
    """JPEGs decoded on ``device`` in one batch (torchvision's nvJPEG path) as uint8 RGB [3, H, W] tensors. The
    EXIF orientation is applied on the CPU side of torchvision where it has one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


class _Name:
    """A name for messages, computed only when a message needs it."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return str(self.name() if callable(self.name) else self.name)
