"""preprocess.PreprocessCache: an entry follows its source files and settings, a cached sample
equals the uncached one bit for bit, and a damaged entry is rebuilt."""
import os

import cv2
import numpy as np
import pytest
import torch

from load_dataset import Pair, SegmentationDataset
from preprocess import PreprocessCache, read_image, read_mask, resize_pair

SIZE = (64, 64)


def textured(h, w, seed, lesion=(60, 40, 35)):
    """RGB image with noise (so JPEG and area resizing have work to do) and a dark ellipse."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, 40, (h, w, 3), dtype=np.uint8))
    cv2.ellipse(image, (w // 2, h // 2), (w // 4, h // 5), 20, 0, 360, lesion, -1)
    return image


def ellipse_mask(h, w, axes=None):
    axes = axes or (w // 4, h // 5)
    return cv2.ellipse(np.zeros((h, w), np.uint8), (w // 2, h // 2), axes, 20, 0, 360, 255, -1)


def write_image(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))


def write_mask(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)


def bump_mtime(path, seconds=10):
    """A later modification time, whatever the file system's timestamp resolution."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def direct(image_path, mask_path, size_hw):
    """The uncached preprocessing, as SegmentationDataset does it without a cache."""
    image = read_image(image_path, min_hw=size_hw)
    mask = read_mask(mask_path) if mask_path else None
    return resize_pair(image, mask, size_hw)


@pytest.fixture
def pair(tmp_path):
    """A 600x450 JPEG (large enough for a reduced-scale decode) and its 0/255 mask."""
    p = Pair("ISIC_0000001", tmp_path / "images" / "ISIC_0000001.jpg",
             tmp_path / "masks" / "ISIC_0000001_segmentation.png")
    write_image(p.image, textured(450, 600, seed=1))
    write_mask(p.mask, ellipse_mask(450, 600))
    return p


def test_entry_is_rebuilt_when_the_image_file_changes(pair, tmp_path):
    cache = PreprocessCache(tmp_path / ".cache", SIZE)
    old_image, old_mask = cache.load(pair.image, pair.mask)
    old_entry = cache.path_for(pair.image, pair.mask)
    assert old_entry.is_file()

    write_image(pair.image, textured(450, 600, seed=2, lesion=(200, 30, 30)))  # new content
    bump_mtime(pair.image)
    new_image, new_mask = cache.load(pair.image, pair.mask)

    assert cache.path_for(pair.image, pair.mask) != old_entry
    expected, _ = direct(pair.image, pair.mask, SIZE)
    np.testing.assert_array_equal(new_image, expected)  # the new content, not the stale entry
    assert np.abs(new_image.astype(int) - old_image.astype(int)).mean() > 10
    np.testing.assert_array_equal(new_mask, old_mask)  # the mask did not change


def test_a_true_mask_is_decoded_once_then_read_from_the_cache(pair, tmp_path, monkeypatch):
    import preprocess
    decoded = []
    monkeypatch.setattr(preprocess, "read_mask", lambda path: decoded.append(path)
                        or read_mask(path))
    cache = PreprocessCache(tmp_path / ".cache", SIZE)
    first = cache.truth(pair.mask)
    second = PreprocessCache(tmp_path / ".cache", SIZE).truth(pair.mask)  # a later run
    assert decoded == [pair.mask]
    assert second[1] == first[1] == (450, 600)
    np.testing.assert_array_equal(preprocess.unpack_truth(*second), read_mask(pair.mask) > 0)


def test_entry_is_rebuilt_when_the_mask_file_changes(pair, tmp_path):
    cache = PreprocessCache(tmp_path / ".cache", SIZE)
    _, old_mask = cache.load(pair.image, pair.mask)
    write_mask(pair.mask, ellipse_mask(450, 600, axes=(60, 40)))  # a smaller lesion
    bump_mtime(pair.mask)
    _, new_mask = cache.load(pair.image, pair.mask)
    _, expected = direct(pair.image, pair.mask, SIZE)
    np.testing.assert_array_equal(new_mask, expected)
    assert new_mask.sum() < old_mask.sum()


def test_a_changed_setting_gives_its_own_entry_of_the_right_shape(pair, tmp_path):
    square = PreprocessCache(tmp_path / ".cache", (64, 64))
    tall = PreprocessCache(tmp_path / ".cache", (96, 64))
    linear = PreprocessCache(tmp_path / ".cache", (64, 64), interpolation="linear")
    entries = {c.path_for(pair.image, pair.mask) for c in (square, tall, linear)}
    entries.add(square.path_for(pair.image, pair.mask, exif=False))
    assert len(entries) == 4

    square_image, square_mask = square.load(pair.image, pair.mask)
    tall_image, tall_mask = tall.load(pair.image, pair.mask)
    assert square_image.shape == (64, 64, 3) and square_mask.shape == (64, 64)
    assert tall_image.shape == (96, 64, 3) and tall_mask.shape == (96, 64)
    for got, size in (((square_image, square_mask), (64, 64)), ((tall_image, tall_mask), (96, 64))):
        expected = direct(pair.image, pair.mask, size)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    # the first entry is still served as it was after the other settings were built
    again_image, _ = square.load(pair.image, pair.mask)
    np.testing.assert_array_equal(again_image, square_image)


@pytest.fixture
def mixed_pairs(tmp_path):
    """A large JPEG, a PNG image, a mask at half its image's size, and an image with no mask."""
    root = tmp_path / "data"
    big = Pair("big", root / "big.jpg", root / "big_segmentation.png")
    write_image(big.image, textured(450, 600, seed=3))
    write_mask(big.mask, ellipse_mask(450, 600))
    png = Pair("png", root / "png.png", root / "png_segmentation.png")
    write_image(png.image, textured(70, 90, seed=4))
    write_mask(png.mask, ellipse_mask(70, 90))
    half = Pair("half", root / "half.jpg", root / "half_segmentation.png")
    write_image(half.image, textured(200, 240, seed=5))
    write_mask(half.mask, ellipse_mask(100, 120))  # same aspect ratio, resized (nearest)
    bare = Pair("bare", root / "bare.jpg", None)
    write_image(bare.image, textured(128, 160, seed=6))
    return [big, png, half, bare]


@pytest.mark.parametrize("augment", [None, "full"])
def test_cached_sample_equals_the_uncached_one_exactly(mixed_pairs, tmp_path, augment):
    cache = PreprocessCache(tmp_path / ".cache", SIZE)
    plain = SegmentationDataset(mixed_pairs, SIZE, augment=augment, seed=5)
    building = SegmentationDataset(mixed_pairs, SIZE, augment=augment, cache=cache, seed=5)
    reading = SegmentationDataset(mixed_pairs, SIZE, augment=augment, cache=cache, seed=5)
    for i in range(len(mixed_pairs)):
        want = plain[i]
        for got in (building[i], reading[i]):  # the entry written, then the entry read back
            assert got[2] == want[2]
            assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
            assert torch.equal(got[0], want[0]), mixed_pairs[i].id
            assert torch.equal(got[1], want[1]), mixed_pairs[i].id
    assert len(list(cache.dir.rglob("*.npy"))) == len(mixed_pairs)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_entry_is_rebuilt(pair, tmp_path, damage):
    cache = PreprocessCache(tmp_path / ".cache", SIZE)
    good_image, good_mask = cache.load(pair.image, pair.mask)
    entry = cache.path_for(pair.image, pair.mask)
    data = entry.read_bytes()
    entry.write_bytes({"garbage": b"not a numpy file at all" * 10,
                       "truncated": data[:len(data) // 2],  # a crash mid-copy, header intact
                       "empty": b""}[damage])

    image, mask = cache.load(pair.image, pair.mask)
    np.testing.assert_array_equal(image, good_image)
    np.testing.assert_array_equal(mask, good_mask)
    assert np.load(entry).shape == (*SIZE, 4)  # and the entry on disk is whole again


def test_build_cache_on_the_command_line_fills_what_training_reads(tmp_path, monkeypatch):
    """`load_dataset.py --build-cache` writes the entries and true masks a run at that size then
    reads: afterwards nothing is decoded again."""
    import demo_data
    import load_dataset
    import preprocess
    root = tmp_path / "data"
    demo_data.make_demo(root, count=6, seed=1)
    assert load_dataset.main(["--data", str(root), "--build-cache", "--image-size", "64",
                              "64"]) == 0

    def decoded(*args, **kwargs):
        raise AssertionError("decoded although the cache was built")
    monkeypatch.setattr(preprocess, "read_image", decoded)
    monkeypatch.setattr(preprocess, "read_mask", decoded)
    found = load_dataset.scan(root)
    cache = PreprocessCache(load_dataset.cache_dir_for(root), SIZE)
    pairs = [p for split in found.splits.values() for p in split]
    assert len(pairs) == 6
    for p in pairs:
        image, mask = cache.load(p.image, p.mask, p.exif)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        cache.truth(p.mask)
