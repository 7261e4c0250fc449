"""Image decoding (every PIL mode, bad files), resizing, text-safe augmentation and tokenisation."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_PIXEL,
    ImageError,
    hflip_sample,
    load_image,
    normalize_images,
    preprocess,
    preprocess_with_meta,
    random_augment,
    resize_to,
    swap_left_right,
    tokenize,
    unresize_logits,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- modes
def test_greyscale_and_bilevel_modes():
    out = load_image(_encode(Image.new("L", (5, 3), 77)))
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8 and (out == 77).all()
    one = Image.new("1", (4, 2), 0)
    one.putpixel((1, 0), 1)
    out = load_image(_encode(one))
    assert out[0, 1].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 0, 0]


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    out = load_image(_encode(rgba))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2].astype(int) - 127).max() <= 1
    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (100, 0))
    out = load_image(_encode(la))
    assert out[0, 0].tolist() == [100] * 3 and out[0, 1].tolist() == [255] * 3


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_with_and_without_transparency(transparent):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    p.putpixel((1, 0), 1)
    data = _encode(p, transparency=0) if transparent else _encode(p)
    out = load_image(data)
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[0, 0].tolist() == ([255, 255, 255] if transparent else [0, 0, 0])


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    out = load_image(_encode(cmyk, "JPEG", quality=95))
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 12
    out = load_image(_encode(Image.new("CMYK", (2, 2), (255, 0, 255, 0)), "TIFF"))  # green
    assert (out == [0, 255, 0]).all()


def test_sixteen_bit_is_scaled_not_clipped():
    a = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    out = load_image(_encode(img))
    assert out[0, :, 0].tolist() == [0, 100, 255, 4] and (out[..., 0] == out[..., 2]).all()


def test_int32_and_float_modes_by_range():
    i32 = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    assert i32.mode == "I"
    assert load_image(_encode(i32, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert f.mode == "F"
    assert load_image(_encode(f, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], np.float32))  # min-max stretched
    assert load_image(_encode(wide, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.paste((0, 0, 255), (2, 0, 4, 2))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = _encode(img, exif=exif)
    out = load_image(data)
    assert out.shape == (4, 2, 3)
    assert (out[:2] == [255, 0, 0]).all() and (out[2:] == [0, 0, 255]).all()  # left went to the top
    assert load_image(data, exif=False).shape == (2, 4, 3)


def test_draft_decodes_big_jpeg_smaller_but_not_below_target():
    data = _encode(Image.new("RGB", (800, 600), (0, 128, 255)), "JPEG", quality=95)
    out = load_image(data, target_size=128)
    assert out.shape == (150, 200, 3)  # 1/4 scale keeps both sides >= 128
    assert np.abs(out.astype(int) - [0, 128, 255]).max() <= 3
    assert load_image(data).shape == (600, 800, 3)


# ----------------------------------------------------------------------------- bad files
def _bad_files(tmp_path):
    good = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "ok.jpg").write_bytes(good)
    (tmp_path / "adir.jpg").mkdir()
    return {
        "missing": (tmp_path / "nope.jpg", {}, "does not exist"),
        "directory": (tmp_path / "adir.jpg", {}, "directory"),
        "empty": (tmp_path / "empty.jpg", {}, "empty"),
        "not an image": (tmp_path / "text.jpg", {}, "not in a readable image format"),
        "truncated": (tmp_path / "cut.jpg", {}, "truncated or corrupt"),
        "too large": (tmp_path / "ok.jpg", {"max_pixels": 1000}, "more than the limit"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "not an image", "truncated", "too large"])
def test_bad_files_raise_image_error_naming_the_path(tmp_path, case):
    path, kw, phrase = _bad_files(tmp_path)[case]
    with pytest.raises(ImageError) as err:
        load_image(path, **kw)
    msg = str(err.value)
    assert str(path) in msg and phrase in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_bad_bytes_are_named():
    with pytest.raises(ImageError, match="shard-3/row-7"):
        load_image(b"garbage bytes", name="shard-3/row-7")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


# ----------------------------------------------------------------------------- resizing
def test_preprocess_keeps_a_pure_colour_and_normalize_images_normalises_it():
    image = np.zeros((40, 30, 3), np.uint8)
    image[:] = (255, 0, 128)
    x, m = preprocess(image, None, 16, keep_aspect=False)
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8 and m is None
    assert (x.reshape(3, -1) == np.array([255, 0, 128])[:, None]).all()
    want = (np.array([255, 0, 128]) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    got = normalize_images(torch.from_numpy(x[None]))[0].numpy()
    assert np.allclose(got.reshape(3, -1), want[:, None], atol=1e-5)


def test_normalize_images_is_bit_identical_to_the_float32_formula_and_passes_floats_through():
    # every uint8 value in every channel: (1, 3, 2, 256), the second row reversed
    values = np.arange(256, dtype=np.uint8)
    pixels = np.broadcast_to(np.stack([values, values[::-1]]), (1, 3, 2, 256)).copy()
    x = torch.from_numpy(pixels.copy())
    got = normalize_images(x)
    assert got.dtype == torch.float32 and got.shape == x.shape and np.array_equal(x.numpy(), pixels)  # x kept
    # the float32 operations the host normalisation (a lookup table) used before issue 25
    table = (np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD  # (256, 3)
    want = table[pixels.transpose(0, 2, 3, 1), np.arange(3)].transpose(0, 3, 1, 2)
    assert want.dtype == np.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))  # bit for bit
    channels_last = normalize_images(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(channels_last, got)
    for already in (torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4).to(torch.bfloat16)):
        assert normalize_images(already) is already  # normalised floats: unchanged


def test_keep_aspect_pads_bottom_right_and_mask_stays_binary():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)
    mask = (rng.random((50, 100)) > 0.5).astype(np.uint8)
    x, m, meta = preprocess_with_meta(image, mask, 32, keep_aspect=True)
    assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == np.uint8
    assert (meta["resized_h"], meta["resized_w"], meta["pad_h"], meta["pad_w"]) == (16, 32, 16, 0)
    assert (x[:, 16:] == MEAN_PIXEL[:, None, None]).all() and (m[16:] == 0).all()  # padding: the mean colour
    assert MEAN_PIXEL.tolist() == [124, 116, 104]
    assert np.abs(normalize_images(torch.from_numpy(x[None]))[0, :, 16:].numpy()).max() < 0.01  # ~0 normalised
    assert set(np.unique(m[:16]).tolist()) == {0, 1}
    x2, m2 = preprocess(image, mask, 32, keep_aspect=False)
    assert set(np.unique(m2).tolist()) == {0, 1} and x2[:, 16:].std() > 5  # no padding


def test_geometry_follows_the_mask_when_image_was_drafted_smaller():
    mask = np.zeros((100, 200), np.uint8)
    mask[:, :100] = 1
    small = np.zeros((25, 50, 3), np.uint8)
    small[:, :25] = 255
    x, m, meta = preprocess_with_meta(small, mask, 64, keep_aspect=True)
    assert (meta["orig_h"], meta["orig_w"], meta["resized_h"]) == (100, 200, 32)
    bright = x[0, :32] >= 128
    assert (bright == m[:32].astype(bool)).mean() > 0.97


@pytest.mark.parametrize("keep_aspect", [True, False])
def test_unresize_round_trip(keep_aspect):
    h, w = 90, 150
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (((yy - 45) / 30.0) ** 2 + ((xx - 60) / 40.0) ** 2 < 1).astype(np.uint8)
    _, m, meta = preprocess_with_meta(np.zeros((h, w, 3), np.uint8), mask, 64, keep_aspect)
    back = unresize_logits(m.astype(np.float32), meta) > 0.5
    assert back.shape == (h, w)
    assert (back & (mask > 0)).sum() / (back | (mask > 0)).sum() > 0.93
    # the Ray batch columns (orig_h, orig_w) plus keep_aspect are enough
    same = unresize_logits(m.astype(np.float32), {"orig_h": h, "orig_w": w, "keep_aspect": keep_aspect})
    assert np.array_equal(same > 0.5, back)


# ----------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("before, after", [
    ("the man on the left", "the man on the right"),
    ("Leftmost guy, right?", "Rightmost guy, left?"),
    ("LEFT car", "RIGHT car"),
    ("the left-most cup and the right-hand one", "the right-most cup and the left-hand one"),
    ("lefthand side, rightwards", "righthand side, leftwards"),
    ("the dog right next to the left car", "the dog right next to the right car"),
    ("bright leftover copyright", "bright leftover copyright"),
])
def test_swap_left_right(before, after):
    assert swap_left_right(before) == after
    assert swap_left_right(after) == before or "right next" in before


def test_hflip_mirrors_image_and_mask_and_swaps_words():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    mask = np.array([[1, 0, 0], [1, 1, 0]], np.uint8)
    im2, m2, s2 = hflip_sample(image, mask, "the left one")
    assert np.array_equal(im2, image[:, ::-1]) and np.array_equal(m2, mask[:, ::-1])
    assert s2 == "the right one" and im2.flags.c_contiguous
    im3, m3, s3 = hflip_sample(im2, m2, s2)
    assert np.array_equal(im3, image) and np.array_equal(m3, mask) and s3 == "the left one"


def test_random_augment_keeps_hue_mask_and_meaning():
    image = np.zeros((60, 80, 3), np.uint8)
    image[:] = (180, 90, 40)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 5:25] = 1
    rng = np.random.default_rng(1)
    hue0 = colorsys.rgb_to_hsv(*(image[0, 0] / 255.0))[0]
    for _ in range(10):
        im, m, s = random_augment(image, mask, "the left box", rng, hflip_prob=1.0, min_scale=1.0)
        assert s == "the right box" and np.array_equal(m, mask[:, ::-1])
        hue = colorsys.rgb_to_hsv(*(im[0, 0] / 255.0))[0]
        assert abs(hue - hue0) < 0.01 and im.dtype == np.uint8
    im, m, s = random_augment(image, mask, "the left box", rng, hflip_prob=0.0, min_scale=0.7)
    assert s == "the left box" and im.shape == image.shape and set(np.unique(m).tolist()) == {0, 1}
    assert 0.7**2 * 0.8 * mask.sum() <= m.sum() <= mask.sum() * 1.05  # zoomed out, never cropped


def test_zoomed_out_mask_stays_on_the_object():
    """Zoom-out resamples the mask with the image's bilinear filter (thresholded): it covers the same
    pixels as the object it marks, also for ~10 px objects where nearest drops whole rows."""
    rng = np.random.default_rng(0)
    ious = []
    for _ in range(20):
        image = np.full((96, 96, 3), 200, np.uint8)
        mask = np.zeros((96, 96), np.uint8)
        y, x, h, w = (int(v) for v in rng.integers([5, 5, 6, 6], [80, 80, 14, 14]))
        image[y:y + h, x:x + w] = (220, 40, 40)
        mask[y:y + h, x:x + w] = 1
        im, m, _ = random_augment(image, mask, "the red one", rng, hflip_prob=0.5, brightness=0, contrast=0,
                                  min_scale=0.8)
        red = (im[..., 0].astype(int) - im[..., 1]) >= 90  # at least half-way to the object colour
        ious.append((red & (m > 0)).sum() / (red | (m > 0)).sum())
    # nearest resampling of the mask: min 0.91, mean 0.988 on these 20 draws
    assert min(ious) > 0.95 and np.mean(ious) > 0.995, ious


def test_augment_straight_to_model_geometry():
    """out_size: zoom-out and resize in one resampling -- the output has that size, the mask covers the
    object there, and without zoom or photometric change it is exactly a bilinear resize."""
    rng = np.random.default_rng(3)
    image = np.full((150, 190, 3), 200, np.uint8)
    image[40:90, 30:110] = (40, 80, 225)
    mask = np.zeros((150, 190), np.uint8)
    mask[40:90, 30:110] = 1
    plain, m, _ = random_augment(image, mask, "the blue one", rng, hflip_prob=0, brightness=0, contrast=0,
                                 min_scale=1.0, out_size=(96, 96))
    assert np.array_equal(plain, resize_to(image, 96, 96, Image.BILINEAR))
    assert np.array_equal(m, resize_to(mask * 255, 96, 96, Image.BILINEAR) >= 128)
    for _ in range(10):
        im, m, _ = random_augment(image, mask, "the blue one", rng, hflip_prob=0.5, brightness=0, contrast=0,
                                  min_scale=0.7, out_size=(96, 80))
        assert im.shape == (96, 80, 3) and m.shape == (96, 80) and set(np.unique(m).tolist()) == {0, 1}
        blue = im[..., 2].astype(int) - im[..., 0] >= 90  # at least half-way to the object colour
        assert (blue & (m > 0)).sum() / (blue | (m > 0)).sum() > 0.95
        area = mask.sum() * (96 / 150) * (80 / 190)  # the object's area at the output size
        assert 0.7**2 * 0.9 * area <= m.sum() <= 1.05 * area  # zoomed out, never cropped


# ----------------------------------------------------------------------------- text
def test_tokenize_pads_and_truncates(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "left", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    # from_pretrained(dir) reads vocab.txt in transformers 4 and 5 (in 5, vocab_file= is ignored)
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))
    ids, att = tokenize(tok, ["the red circle", "the left red circle on the left"], max_length=6)
    assert ids.shape == att.shape == (2, 6) and ids.dtype == att.dtype == np.int64
    assert ids[0].tolist() == [2, 5, 6, 8, 3, 0] and att[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1, 0] == 2 and ids[1, -1] == 3 and att[1].all()  # truncated, still ends with [SEP]


def test_preprocess_lays_out_the_resized_pixels_on_a_mean_colour_canvas() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out, _ = preprocess(image, None, 48, keep_aspect=True)
    resized = np.asarray(Image.fromarray(image).resize((48, 34), Image.BILINEAR))
    expected = np.empty((3, 48, 48), np.uint8)
    expected[:] = MEAN_PIXEL[:, None, None]
    expected[:, :34, :48] = resized.transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)
    # on the device: the content bit-identical to the float32 formula of before issue 25
    normalised = normalize_images(torch.from_numpy(out[None]))[0].numpy()
    formula = ((resized.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    np.testing.assert_array_equal(normalised[:, :34], formula)
