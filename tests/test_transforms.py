"""Decode + augmentation + padding (umg_jax/data/transforms.py).

References are independent of the code under test: boxes and masks are checked against pixels
rendered into the image (found again after the crop / flip by colour), pooling and targets
against hand-computed values, normalisation against the CLIP formula.
"""

import numpy as np
import pytest

from umg_jax.data import records, schema, tokenizer
from umg_jax.data import transforms as T

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _rle(mask):
    return records.mask_to_rle(np.asarray(mask, np.uint8))


def _record(
    image,
    *,
    regions=(),
    segments=(),
    captions=("a scene",),
    tags=("scene",),
    source="test:0",
    confidence=1.0,
    image_bytes=None,
    height=None,
    width=None,
):
    h, w = image.shape[:2]
    return records.encode_record({
        "source": source,
        "image": records.encode_image(image) if image_bytes is None else image_bytes,
        "height": h if height is None else height,
        "width": w if width is None else width,
        "captions": list(captions),
        "tags": list(tags),
        "regions": [dict(dict(caption=None, tags=["thing"], category=-1), **r) for r in regions],
        "segments": [
            dict(dict(caption=None, tags=["thing"], category=-1, isthing=True, region=-1), **s)
            for s in segments
        ],
        "confidence": confidence,
    })


def _box_mask(h, w, box):
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    return m


def _scene(h=96, w=128):
    """Grey image with a red and a blue filled box; each has a region and a segment."""
    img = np.full((h, w, 3), 128, np.uint8)
    red, blue = (30, 20, 70, 60), (80, 50, 120, 90)
    for (x0, y0, x1, y1), c in ((red, RED), (blue, BLUE)):
        img[y0:y1, x0:x1] = c
    raw = _record(
        img,
        regions=[dict(box=list(red), category=1, caption="a red box"),
                 dict(box=list(blue), category=2, caption="a blue box")],
        segments=[dict(rle=_rle(_box_mask(h, w, red)), category=1),
                  dict(rle=_rle(_box_mask(h, w, blue)), category=2)],
    )
    return raw, red, blue


@pytest.fixture(scope="module")
def tok():
    return tokenizer.get_tokenizer(16)


def _cfg(**kw):
    base = dict(image_size=64, patch_size=8, context_length=16, max_tags=3, max_regions=4,
                max_masks=4, train=True, crop_scale=(0.3, 1.0), flip=True, min_region_frac=0.0,
                min_mask_frac=0.0)
    base.update(kw)
    return T.TransformConfig(**base)


def _unnormalize(img):
    mean, std = np.array(T.CLIP_MEAN), np.array(T.CLIP_STD)
    return np.clip(np.round((img * std + mean) * 255), 0, 255).astype(np.uint8)


def _iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return (a & b).sum() / max((a | b).sum(), 1)


def _box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda z: (z[2] - z[0]) * (z[3] - z[1])
    return inter / (area(a) + area(b) - inter)


def _pixels_of(img_u8, colour):
    return np.all(np.abs(img_u8.astype(int) - np.array(colour)) < 60, axis=-1)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_augmentation_keeps_boxes_and_masks_aligned(tok):
    raw, _, _ = _scene()
    cfg = _cfg()
    checked, flips_seen = 0, set()
    for seed in range(12):
        ex = T.make_example(raw, np.random.default_rng(seed), cfg, tok)
        img = _unnormalize(ex["image"])
        S = cfg.image_size
        for colour, cls in ((RED, 1), (BLUE, 2)):
            pix = _pixels_of(img, colour)
            ri = np.flatnonzero(ex["region_valid"] & (ex["region_class"] == cls))
            mi = np.flatnonzero(ex["mask_valid"] & (ex["mask_class"] == cls))
            if pix.sum() < 30:  # cropped (nearly) away: then the region must be gone or tiny
                continue
            assert ri.size == 1 and mi.size == 1, (seed, colour)
            box = ex["region_boxes"][ri[0]] * S
            assert _box_iou(box, _bbox(pix)) > 0.9, (seed, colour, box, _bbox(pix))
            assert _iou(ex["segmap"] == mi[0], pix) > 0.9, (seed, colour)
            # mask_area is the average pool of the same mask over 8x8 cells
            ref = (ex["segmap"] == mi[0]).reshape(8, 8, 8, 8).mean((1, 3))
            np.testing.assert_allclose(ex["mask_area"][mi[0]], ref, atol=1e-6)
            checked += 1
        # the red box is left of the blue one in the source; a flip swaps that
        r, b = _pixels_of(img, RED), _pixels_of(img, BLUE)
        if r.sum() > 30 and b.sum() > 30:
            flips_seen.add(bool(np.nonzero(r)[1].mean() > np.nonzero(b)[1].mean()))
    assert checked >= 12 and flips_seen == {True, False}


def test_eval_mode_is_deterministic_resize_only(tok):
    raw, red, _ = _scene()
    cfg = _cfg(train=False)
    a = T.make_example(raw, np.random.default_rng(0), cfg, tok)
    b = T.make_example(raw, np.random.default_rng(1), cfg, tok)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # whole image squashed to 64x64: boxes scale by (64/128, 64/96)
    sx, sy = 64 / 128, 64 / 96
    np.testing.assert_allclose(
        a["region_boxes"][0] * 64, [red[0] * sx, red[1] * sy, red[2] * sx, red[3] * sy], atol=1e-4)


def test_sample_crop_bounds_and_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, cw, ch = T.sample_crop(rng, 90, 120, (0.3, 0.9), (3 / 4, 4 / 3))
        assert 0 <= x0 and 0 <= y0 and x0 + cw <= 120 and y0 + ch <= 90
        assert 0.25 <= cw * ch / (90 * 120) <= 0.95
    # impossible scale -> fallback: the whole image within the ratio range
    assert T.sample_crop(rng, 10, 10, (5.0, 6.0)) == (0, 0, 10, 10)


def test_normalize_matches_clip_formula():
    img = np.array([[[0, 128, 255]]], np.uint8)
    out = T.normalize(img)
    ref = [(0 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258,
           (255 / 255 - 0.40821073) / 0.27577711]
    np.testing.assert_allclose(out[0, 0], ref, rtol=1e-6)


def test_pool_pixel_target_segmap_by_hand():
    # 4x4 image, patch 2 -> 2x2 cells
    m0 = np.zeros((4, 4), np.uint8)
    m0[:, :2] = 1  # left half
    m1 = np.zeros((4, 4), np.uint8)
    m1[0, 0] = 1  # one pixel, overlapping m0: the smaller wins in the segmap
    m1[2:, 2] = 1  # half of the bottom-right cell... with m0 absent there
    masks = np.stack([m0, m1])
    seg = T.build_segmap(masks)
    assert seg[0, 0] == 1 and seg[1, 0] == 0 and seg[0, 3] == -1 and seg[3, 2] == 1
    area = T.pool_masks(masks, 2)
    np.testing.assert_allclose(area[0], [[1, 0], [1, 0]])
    np.testing.assert_allclose(area[1], [[0.25, 0], [0, 0.5]])
    # cells: TL {1:1, 0:3} -> 0; TR all unlabeled -> -1; BL all 0 -> 0; BR {1:2, -1:2} -> tie -> -1
    np.testing.assert_array_equal(T.pixel_target(seg, 2, 2), [[0, -1], [0, -1]])


def test_padding_keeps_largest_and_validity(tok):
    h = w = 64
    img = np.full((h, w, 3), 90, np.uint8)
    sizes = [4, 20, 6, 30, 8, 10, 12, 2]  # box side per region / mask
    regions, segments = [], []
    for i, s in enumerate(sizes):
        box = (i * 2, i * 2, i * 2 + s, i * 2 + s)
        regions.append(dict(box=list(box), category=i))
        segments.append(dict(rle=_rle(_box_mask(h, w, box)), category=i, isthing=i != 3))
    raw = _record(img, regions=regions, segments=segments, captions=[], tags=list("abcde"))
    cfg = _cfg(train=False, max_regions=3, max_masks=4)
    ex = T.make_example(raw, None, cfg, tok)
    # the 3 largest regions (30, 20, 12 -> classes 3, 1, 6) kept in record order
    np.testing.assert_array_equal(ex["region_class"], [1, 3, 6])
    np.testing.assert_array_equal(ex["region_valid"], [True, True, True])
    np.testing.assert_array_equal(ex["mask_class"], [1, 3, 5, 6])
    np.testing.assert_array_equal(ex["mask_isthing"], [True, False, True, True])
    # label: largest *thing* mask (class 3 is stuff here) -> class 1
    assert ex["label"] == 1
    assert not ex["text_valid"]
    np.testing.assert_array_equal(ex["tags_valid"], [True, True, True])
    # tag prompts tokenised with the template; padding rows are the empty text
    np.testing.assert_array_equal(ex["tags"][0], tok(["a photo of a a."])[0])
    shapes = schema.batch_shapes(batch_size=1, image_size=64, patch_size=8, max_tags=3,
                                 max_regions=3, max_masks=4, context_length=16)
    schema.check_batch({k: v[None] for k, v in ex.items()}, shapes)

    # fewer than the maximum: padded rows invalid, class -1, empty-text tokens
    raw = _record(img, regions=regions[:1], segments=segments[:1], captions=["one", "two"])
    ex = T.make_example(raw, None, _cfg(train=False), tok)
    np.testing.assert_array_equal(ex["region_valid"], [True, False, False, False])
    np.testing.assert_array_equal(ex["mask_valid"], [True, False, False, False])
    np.testing.assert_array_equal(ex["region_class"], [0, -1, -1, -1])
    np.testing.assert_array_equal(ex["region_boxes"][1:], 0)
    np.testing.assert_array_equal(ex["mask_area"][1:], 0)
    np.testing.assert_array_equal(ex["region_text"][1], tok([""])[0])
    np.testing.assert_array_equal(ex["text"], tok(["one"])[0])  # eval: the first caption
    assert ex["text_valid"] and ex["tags_valid"].tolist() == [True, False, False]
    assert ex["segmap"].max() == 0 and set(np.unique(ex["pixel_target"])) <= {-1, 0}


def test_small_regions_dropped_after_crop(tok):
    h = w = 64
    img = np.full((h, w, 3), 90, np.uint8)
    raw = _record(img, regions=[dict(box=[0, 0, 6, 6], category=0),
                                dict(box=[0, 0, 64, 64], category=1)])
    ex = T.make_example(raw, np.random.default_rng(0), _cfg(crop_scale=(1.0, 1.0),
                                                            min_region_frac=0.02), tok)
    # 6x6 of 64x64 = 0.9 % < 2 % -> dropped
    np.testing.assert_array_equal(ex["region_class"], [1, -1, -1, -1])


def test_caption_drawn_at_random_in_train(tok):
    img = np.full((32, 32, 3), 90, np.uint8)
    raw = _record(img, captions=["first caption", "second caption", "third caption"])
    cfg = _cfg(image_size=32)
    seen = {T.make_example(raw, np.random.default_rng(s), cfg, tok)["text"].tobytes()
            for s in range(20)}
    assert seen == {tok([c])[0].tobytes() for c in ("first caption", "second caption",
                                                     "third caption")}


# ----------------------------------------------------------------------------- bad input ---

def _good_parts(h=32, w=32):
    img = np.full((h, w, 3), 90, np.uint8)
    seg = dict(rle=_rle(_box_mask(h, w, (2, 2, 20, 20))))
    return img, dict(box=[2, 2, 20, 20], category=0), seg


def _counts(ex):
    return dict(zip(T.KINDS, ex["drop_counts"].tolist(), strict=True))


def test_bad_record_parse(tok):
    with pytest.raises(T.BadRecordError) as e:
        T.make_example(b"\x00not a record", None, _cfg(train=False), tok)
    assert e.value.kind == "parse"


def test_bad_image_corrupt_and_size(tok):
    img, _, _ = _good_parts()
    good = records.encode_image(img)
    with pytest.raises(T.BadRecordError) as e:
        T.make_example(_record(img, image_bytes=good[: len(good) // 2], source="src:7"), None,
                       _cfg(train=False), tok)
    assert e.value.kind == "image" and e.value.source == "src:7"
    with pytest.raises(T.BadRecordError) as e:
        T.make_example(_record(img, height=40), None, _cfg(train=False), tok)
    assert e.value.kind == "image"


@pytest.mark.parametrize("box", [[10, 10, 10, 20], [5, 5, 2, 9], [40, 40, 50, 50],
                                 [-10, 0, 10, 10], [0, 0, float("nan"), 5]])
def test_bad_box_drops_region(tok, box):
    img, good_region, _ = _good_parts()
    raw = _record(img, regions=[dict(box=box, category=5), good_region])
    ex = T.make_example(raw, None, _cfg(train=False, image_size=32), tok)
    assert _counts(ex)["box"] == 1
    np.testing.assert_array_equal(ex["region_class"], [0, -1, -1, -1])
    with pytest.raises(T.BadRecordError) as e:
        T.make_example(raw, None, _cfg(train=False, image_size=32, strict=True), tok)
    assert e.value.kind == "box"


def test_bad_mask_drops_segment(tok):
    img, _, good_seg = _good_parts()
    wrong_size = dict(rle=_rle(np.ones((16, 32), np.uint8)), category=4)
    empty = dict(rle=_rle(np.zeros((32, 32), np.uint8)), category=6)
    garbage = dict(rle={"size": [32, 32], "counts": "!!!not rle"}, category=7)
    raw = _record(img, segments=[wrong_size, dict(good_seg, category=3), empty, garbage])
    ex = T.make_example(raw, None, _cfg(train=False, image_size=32), tok)
    assert _counts(ex)["mask"] == 3
    np.testing.assert_array_equal(ex["mask_class"], [3, -1, -1, -1])
    with pytest.raises(T.BadRecordError) as e:
        T.make_example(raw, None, _cfg(train=False, image_size=32, strict=True), tok)
    assert e.value.kind == "mask"


def test_bad_captions_dropped(tok):
    img, good_region, _ = _good_parts()
    raw = _record(img, captions=["", b"\xff\xfe bad", "  ", "fine caption"],
                  regions=[dict(good_region, caption="")])
    ex = T.make_example(raw, None, _cfg(train=False, image_size=32), tok)
    assert _counts(ex)["text"] == 4
    np.testing.assert_array_equal(ex["text"], tok(["fine caption"])[0])
    # the region keeps its tag prompt instead of the empty caption
    np.testing.assert_array_equal(ex["region_text"][0], tok(["a photo of a thing."])[0])
    with pytest.raises(T.BadRecordError) as e:
        T.make_example(raw, None, _cfg(train=False, image_size=32, strict=True), tok)
    assert e.value.kind == "text"


def test_transform_is_picklable(tok):
    import pickle

    raw, _, _ = _scene()
    tf = T.ExampleTransform(_cfg())
    a = tf(raw, np.random.default_rng(3))
    b = pickle.loads(pickle.dumps(tf))(raw, np.random.default_rng(3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
