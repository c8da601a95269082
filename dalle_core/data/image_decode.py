"""Downloaded bytes -> the square image a shard stores, decoded safely.

Only `IMAGE_FORMATS` are opened (web image formats: no EPS, which would run
Ghostscript, and the like); an image whose header declares more than
`max_pixels` pixels is refused before anything is decoded (`too_many_pixels`);
the rest must decode fully with Pillow (`decode_error` otherwise). The image is
converted to RGB (transparent areas white, camera orientation applied), its
original size recorded, then resized (shorter side to the image size, centre
square crop, `RESIZE_FILTER`) and encoded as png or jpg. No filtering on size,
aspect ratio or caption happens here: that is the filter stage's job, which
needs the original sizes.
"""

from __future__ import annotations

import io

# what Pillow may open: web image formats only (no EPS, which would run Ghostscript, and the like)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "MPO")
RESIZE_FILTER = "lanczos"  # recorded in every crawl part's done marker (FID depends on it)
IMAGE_EXT = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}  # DataConfig.image_format -> file extension


class ImageDecodeError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def load_rgb(data: bytes, max_pixels: int | None = None, formats: tuple[str, ...] | None = None):
    """Decode image bytes fully and return an RGB PIL image (camera orientation applied).

    Transparent areas become white. Raises ImageDecodeError("decode_error" |
    "too_many_pixels", Pillow's message): truncated data fails
    here, at load(). With `max_pixels`, an image whose header declares more
    pixels is refused before anything is decoded (Image.open reads only the
    header), so a worker's memory stays bounded by max_pixels (see
    DataConfig.max_image_pixels). `formats`: what Pillow may open (default: any).
    """
    from PIL import Image, ImageOps

    if not data:
        raise ImageDecodeError("decode_error", "empty body")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            width, height = im.size  # from the header: nothing decoded yet
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels",
                    f"{im.format} header declares {width}x{height} = {width * height} pixels"
                    f" > max_image_pixels={max_pixels} (not decoded)",
                )
            im.load()  # decode everything now: truncated data fails here
            im = ImageOps.exif_transpose(im)  # camera orientation; returns a copy
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own header check (2 x MAX_IMAGE_PIXELS)
        raise ImageDecodeError("too_many_pixels", f"{e} (not decoded)") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from e
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")  # no extra copy: memory per worker
        del im
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)  # transparent areas become white, not black
        del rgba
        return background.convert("RGB")
    return im.convert("RGB")


def resize_center_crop(img, image_size: int):
    """Shorter side to `image_size`, then the centre square: an image_size^2 image.

    Done in one resampling step: the centre square of side min(w, h) is
    resampled to image_size x image_size (Pillow's resize with `box`).
    Filter: LANCZOS (`RESIZE_FILTER`), as in the released dall_e preprocessing
    (TF.resize(..., interpolation=LANCZOS)); reducing_gap=3 speeds up large
    downscales with no visible difference.
    """
    from PIL import Image

    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return img.resize(
        (image_size, image_size),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def encode_image(img, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    fmt = IMAGE_EXT[image_format.lower()]
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def process_image(
    data: bytes,
    image_size: int,
    image_format: str = "png",
    jpeg_quality: int = 95,
    max_pixels: int | None = None,
):
    """Downloaded bytes -> (encoded square image, original_width, original_height).

    Decode fully (only `IMAGE_FORMATS`, at most `max_pixels` pixels), convert
    to RGB, resize + centre-crop, encode as png or jpg.
    Raises ImageDecodeError("decode_error" | "too_many_pixels", message).
    """
    rgb = load_rgb(data, max_pixels=max_pixels, formats=IMAGE_FORMATS)
    width, height = rgb.size
    return encode_image(resize_center_crop(rgb, image_size), image_format, jpeg_quality), width, height
