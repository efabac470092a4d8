"""load_dataset.py: finding, checking, pairing, splitting, the Dataset, demo data and the CLI,
on small generated trees (plus a few real ISIC fixture pairs)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import demo_data
import load_dataset
import preprocess
from load_dataset import Pair, SegmentationDataset, SplitMismatch, scan, split_pairs

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "isic_sample"
IN18, GT18 = "ISIC2018_Task1-2_{}_Input", "ISIC2018_Task1_{}_GroundTruth"
SKIN, LESION = (205, 160, 140), (60, 40, 35)  # RGB


# ---------------------------------------------------------------------------- tiny files

def lesion_image(h=64, w=80, box=(16, 20, 40, 50), seed=0):
    """RGB skin-coloured image with texture and a dark rectangle (y0, x0, y1, x1)."""
    rng = np.random.default_rng(seed)
    image = (np.float32(SKIN) + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    y0, x0, y1, x1 = box
    image[y0:y1, x0:x1] = LESION
    return image


def box_mask(h=64, w=80, box=(16, 20, 40, 50), value=255):
    mask = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def save_rgb(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))


def save_gray(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)


def write_pair(image_path, mask_path, h=64, w=80, box=(16, 20, 40, 50), seed=0):
    save_rgb(image_path, lesion_image(h, w, box, seed))
    save_gray(mask_path, box_mask(h, w, box))


def isic_ids(*numbers):
    return [f"ISIC_{n:07d}" for n in numbers]


def write_isic(root, image_dir, mask_dir, ids, mask_suffix="_segmentation"):
    for i, pair_id in enumerate(ids):
        write_pair(root / image_dir / f"{pair_id}.jpg",
                   root / mask_dir / f"{pair_id}{mask_suffix}.png", seed=i)


def plant_bad_tree(root):
    """ISIC 2018 training tree with good pairs and one of each bad case.

    Returns (good ids, {file: reason part} skipped, {file: reason part} corrected)."""
    images, masks = root / IN18.format("Training"), root / GT18.format("Training")
    good = isic_ids(1, 2, 3)
    write_isic(root, images.name, masks.name, good)

    def mask_of(n):
        return masks / f"ISIC_{n:07d}_segmentation.png"

    def image_of(n, ext=".jpg"):
        return images / f"ISIC_{n:07d}{ext}"

    for n in range(10, 30):  # every bad image gets a good mask, and the reverse
        save_gray(mask_of(n), box_mask())
        save_rgb(image_of(n), lesion_image(seed=n))
    image_of(10).write_bytes(b"")
    image_of(11).write_text("this is not a picture\n")
    data = image_of(12).read_bytes()
    image_of(12).write_bytes(data[: len(data) // 2])
    image_of(13).unlink()
    save_rgb(image_of(13, ".png"), lesion_image(20, 24, (2, 2, 10, 10)))  # too small
    mask_of(14).unlink()  # image without mask
    image_of(15).unlink()  # mask without image
    save_gray(mask_of(16), box_mask(32, 40, (8, 10, 20, 25)))  # half size, same aspect ratio
    save_gray(mask_of(17), box_mask(64, 64))  # other aspect ratio
    save_rgb(mask_of(18), np.repeat(box_mask()[..., None], 3, 2))  # RGB mask
    Image.fromarray(np.dstack([box_mask()] * 4), "RGBA").save(mask_of(19))
    save_gray(mask_of(20), box_mask(value=1))  # 0/1 mask
    noisy = box_mask()
    noisy[0, :4], noisy[20, 25:29] = (3, 7, 2, 1), (250, 251, 249, 252)  # JPEG-like artefacts
    save_gray(mask_of(21), noisy)
    save_gray(image_of(22), cv2.cvtColor(lesion_image(seed=22), cv2.COLOR_RGB2GRAY))
    image_of(23).unlink()
    Image.fromarray(np.dstack([lesion_image(seed=23), np.full((64, 80), 255, np.uint8)]),
                    "RGBA").save(image_of(23, ".png"))
    Image.fromarray(lesion_image(seed=24)).convert("CMYK").save(image_of(24))
    image_of(25).unlink()
    gray16 = cv2.cvtColor(lesion_image(seed=25), cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    save_gray(image_of(25, ".png"), gray16)
    # stored 64 wide x 80 high, shown 80 x 64 after EXIF orientation 6 (rotate 90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.rot90(lesion_image(seed=26), 1).copy())
    stored.save(image_of(26), exif=exif.tobytes())
    save_rgb(image_of(1, ".png"), lesion_image())  # ISIC_0000001 twice
    save_gray(mask_of(27), np.zeros((64, 80), np.uint8))  # no lesion at all: legal
    for n in (28, 29):
        image_of(n).unlink()
        mask_of(n).unlink()
    # files that are not data and must be ignored without a word
    (images / "ISIC_0000001_superpixels.png").write_bytes(image_of(1, ".png").read_bytes())
    (images / "ISIC2018_Task1-2_Training_Input_metadata.csv").write_text("image,age\n")
    (images / "LICENSE.txt").write_text("CC BY-NC\n")
    (images / ".ISIC_0000002.jpg").write_bytes(b"\x00\x05mac resource fork")
    macosx = root / "__MACOSX" / images.name
    macosx.mkdir(parents=True)
    (macosx / "._ISIC_0000003.jpg").write_bytes(b"\x00\x05junk")
    (macosx / "ISIC_0000004.jpg").write_bytes(b"\x00\x05junk")
    (root / ".cache" / "320x320").mkdir(parents=True)
    (root / ".cache" / "320x320" / "ISIC_0000005.png").write_bytes(b"junk")

    skipped = {
        image_of(10): "zero-byte file",
        image_of(11): "text file with an image extension",
        image_of(12): "unreadable image",
        image_of(13, ".png"): "smaller than 32 px",
        image_of(14): "image without mask",
        mask_of(15): "mask without image",
        mask_of(17): "differs from its image 80x64 in aspect ratio",
        image_of(17): "its mask ISIC_0000017_segmentation.png is unusable",
        image_of(1, ".png"): f"duplicate of {image_of(1)}",
        mask_of(10): "its image ISIC_0000010.jpg is unusable",
    }
    corrected = {
        mask_of(16): "same aspect ratio: resized (nearest) at load time",
        mask_of(18): "RGB mask reduced to one channel",
        mask_of(19): "RGBA mask reduced to one channel",
        mask_of(20): "0/1 mask",
        mask_of(21): "values other than 0/255 binarised",
        image_of(22): "grayscale converted to RGB",
        image_of(23, ".png"): "alpha channel dropped",
        image_of(24): "CMYK converted to RGB",
        image_of(25, ".png"): "16-bit scaled to 8-bit",
        image_of(26): "EXIF orientation 6 applied",
    }
    usable = good + isic_ids(16, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27)
    return usable, skipped, corrected


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "data"
    usable, skipped, corrected = plant_bad_tree(root)
    return root, usable, skipped, corrected


@pytest.fixture(scope="module")
def bad_scan(bad_tree):
    return scan(bad_tree[0])


def reasons(entries):
    return {Path(path): why for path, why in entries}


# ---------------------------------------------------------------------------- checks

def test_bad_tree_keeps_exactly_the_usable_pairs(bad_tree, bad_scan):
    _, usable, _, _ = bad_tree
    assert bad_scan.layout == "ISIC 2018 Task 1"
    assert list(bad_scan.splits) == ["train"]
    assert [p.id for p in bad_scan.splits["train"]] == sorted(usable)
    pair = {p.id: p for p in bad_scan.splits["train"]}["ISIC_0000001"]
    assert pair.image.name == "ISIC_0000001.jpg"


def test_every_planted_skip_is_reported_with_its_reason(bad_tree, bad_scan):
    _, _, skipped, _ = bad_tree
    found = reasons(bad_scan.skipped)
    for path, why in skipped.items():
        assert path in found, f"{path.name} not reported"
        assert why in found[path], f"{path.name}: {found[path]!r} lacks {why!r}"


def test_every_planted_correction_is_reported_with_its_reason(bad_tree, bad_scan):
    _, _, _, corrected = bad_tree
    found = reasons(bad_scan.corrected)
    for path, why in corrected.items():
        assert path in found, f"{path.name} not reported"
        assert why in found[path], f"{path.name}: {found[path]!r} lacks {why!r}"
    assert set(found) == set(corrected)  # good files are not reported as corrected


def test_ignored_files_are_never_mentioned(bad_scan):
    mentioned = " ".join(str(p) for p, _ in bad_scan.skipped + bad_scan.corrected)
    for name in ("superpixels", "metadata", "LICENSE", "__MACOSX", ".cache", ".ISIC"):
        assert name not in mentioned
    all_pairs = [p for pairs in bad_scan.splits.values() for p in pairs]
    assert not any(".cache" in str(p.image) or "__MACOSX" in str(p.image) for p in all_pairs)


def test_summary_names_each_reported_file_with_reason(bad_tree, bad_scan):
    root = bad_tree[0]
    text = bad_scan.summary()
    assert "Layout: ISIC 2018 Task 1" in text and "train 14" in text
    for path, why in bad_scan.skipped + bad_scan.corrected:  # paths shown relative to the root
        assert f"{path.relative_to(root)}: {why.replace(f'{root}/', '')}" in text


def test_checking_in_a_process_pool_gives_the_same_answer(bad_tree, bad_scan, tmp_path,
                                                          monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(bad_tree[0], root)
    monkeypatch.setattr(load_dataset, "POOL_MIN_FILES", 1)
    pooled = scan(root)
    def rebase(entries, base):
        return [(p.relative_to(base), why.replace(str(base), "")) for p, why in entries]
    assert rebase(pooled.skipped, root) == rebase(bad_scan.skipped, bad_tree[0])
    assert rebase(pooled.corrected, root) == rebase(bad_scan.corrected, bad_tree[0])


def test_second_scan_reuses_the_check_cache_and_rechecks_changed_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2, 3))
    first = scan(root)
    assert load_dataset.scan_memo(root).exists()

    def must_not_decode(task):
        raise AssertionError(f"{task} decoded again")
    monkeypatch.setattr(load_dataset, "check_file", must_not_decode)
    assert scan(root).splits == first.splits
    monkeypatch.undo()

    changed = root / IN18.format("Training") / "ISIC_0000002.jpg"
    changed.write_bytes(changed.read_bytes()[:200])  # truncated after the first scan
    again = scan(root)
    assert [p.id for p in again.splits["train"]] == isic_ids(1, 3)
    assert "unreadable image" in reasons(again.skipped)[changed]


def test_mask_and_image_with_no_partner_folder_are_reported_once_per_folder(tmp_path):
    root = tmp_path / "data"
    for n in range(5):
        save_rgb(root / IN18.format("Test") / f"ISIC_{n:07d}.jpg", lesion_image(seed=n))
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(7))
    found = scan(root)
    assert [p.id for p in found.splits["train"]] == ["ISIC_0000007"]
    assert "test" not in found.splits
    assert reasons(found.skipped) == {
        root / IN18.format("Test"): "images without masks (no matching masks folder found)"}


# ---------------------------------------------------------------------------- pairing, layouts

def test_pairs_are_matched_by_id_not_by_sorted_position(tmp_path):
    # "x" < "x_1" among images ('.' < '_'), but "x_1_segmentation" < "x_segmentation" among masks
    root = tmp_path / "data"
    boxes = {"x_1": (4, 4, 20, 20), "x": (30, 40, 60, 76), "b": (10, 50, 30, 70),
             "a": (40, 5, 60, 30)}
    for stem in ["x_1", "b", "x", "a"]:  # created out of order too
        save_gray(root / "masks" / f"{stem}_segmentation.png", box_mask(box=boxes[stem]))
    for stem in ["a", "x", "x_1", "b"]:
        save_rgb(root / "images" / f"{stem}.jpg", lesion_image(box=boxes[stem]))
    found = scan(root)
    assert found.layout == "plain images/ + masks/"
    pairs = found.splits["train"]
    assert [p.id for p in pairs] == ["a", "b", "x", "x_1"]
    for pair in pairs:
        assert pair.mask.name == f"{pair.id}_segmentation.png"
    # and the loaded mask covers the loaded image's dark rectangle
    for image, mask, _ in SegmentationDataset(pairs, (64, 80)):
        assert dark_fraction_iou(image, mask) > 0.97


def fake_tree(root, kind):
    """A small tree in one layout; returns (layout name, {split: ids})."""
    if kind == "2018":
        write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2, 3))
        write_isic(root, IN18.format("Validation"), GT18.format("Validation"), isic_ids(4))
        write_isic(root, IN18.format("Test"), GT18.format("Test"), isic_ids(5, 6))
        return "ISIC 2018 Task 1", {"train": isic_ids(1, 2, 3), "valid": isic_ids(4),
                                    "test": isic_ids(5, 6)}
    if kind == "2017":
        for split, ids in (("Training", (1, 2)), ("Validation", (3,)), ("Test_v2", (4, 5))):
            write_isic(root, f"ISIC-2017_{split}_Data", f"ISIC-2017_{split}_Part1_GroundTruth",
                       isic_ids(*ids))
        return "ISIC 2017 Part 1", {"train": isic_ids(1, 2), "valid": isic_ids(3),
                                    "test": isic_ids(4, 5)}
    if kind == "2016":
        for split, ids in (("Training", (1, 2, 3)), ("Test", (4,))):
            write_isic(root, f"ISBI2016_ISIC_Part1_{split}_Data",
                       f"ISBI2016_ISIC_Part1_{split}_GroundTruth", isic_ids(*ids),
                       mask_suffix="_Segmentation")
        return "ISIC 2016 Part 1", {"train": isic_ids(1, 2, 3), "test": isic_ids(4)}
    if kind == "plain same stem":
        for stem in ("lesion_b", "lesion_a"):
            write_pair(root / "img" / f"{stem}.png", root / "gt" / f"{stem}.png")
        return "plain img/ + gt/", {"train": ["lesion_a", "lesion_b"]}
    if kind == "nested":  # zips unpacked into folders of their own name, under a downloads folder
        base = root / "downloads"
        for folder, ids in ((IN18.format("Training"), (1, 2)), (GT18.format("Training"), (1, 2))):
            for pair_id in isic_ids(*ids):
                target = base / folder / folder
                if "Input" in folder:
                    save_rgb(target / f"{pair_id}.jpg", lesion_image())
                else:
                    save_gray(target / f"{pair_id}_segmentation.png", box_mask())
        return "ISIC 2018 Task 1", {"train": isic_ids(1, 2)}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["2018", "2017", "2016", "plain same stem", "nested"])
def test_each_layout_is_recognised(tmp_path, kind):
    layout, expected = fake_tree(tmp_path / "data", kind)
    found = scan(tmp_path / "data")
    assert found.layout == layout
    assert {s: [p.id for p in pairs] for s, pairs in found.splits.items()} == expected
    assert found.skipped == [] and found.corrected == []


def test_combined_2017_and_2018_are_deduplicated_without_test_leaking_into_training(tmp_path):
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2, 3, 4, 7))
    write_isic(root, IN18.format("Validation"), GT18.format("Validation"), isic_ids(7, 8))
    write_isic(root, IN18.format("Test"), GT18.format("Test"), isic_ids(9, 10))
    write_isic(root, "ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth",
               isic_ids(1, 2, 11))
    write_isic(root, "ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth",
               isic_ids(3, 9, 12))
    found = scan(root)
    assert found.layout == "ISIC 2017 Part 1 + ISIC 2018 Task 1"
    ids = {s: [p.id for p in pairs] for s, pairs in found.splits.items()}
    assert ids == {"train": isic_ids(1, 2, 3, 4, 11, 12), "valid": isic_ids(7, 8),
                   "test": isic_ids(9, 10)}
    train = {p.id: p for p in found.splits["train"]}
    assert "ISIC2018" in train["ISIC_0000001"].image.parent.name  # the newest copy is kept
    why = reasons(found.skipped)

    def image(folder, n):
        return root / folder / f"ISIC_{n:07d}.jpg"
    train18, valid18, test18 = (IN18.format(s) for s in ("Training", "Validation", "Test"))
    assert why[image(train18, 7)] == f"duplicate of {image(valid18, 7)}"
    assert why[image("ISIC-2017_Test_v2_Data", 9)] == f"duplicate of {image(test18, 9)}"
    assert why[image("ISIC-2017_Training_Data", 1)] == f"duplicate of {image(train18, 1)}"
    assert len(why) == 5  # 2017's copies of 1, 2, 3, 9 and 2018 training's copy of 7


def test_demo_tree_inside_real_data_is_left_out(tmp_path):
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2))
    demo_data.make_demo(root / "demo", count=2, seed=0)
    found = scan(root)
    assert [p.id for p in found.splits["train"]] == isic_ids(1, 2)
    assert "generated demo data" in reasons(found.skipped)[root / "demo"]
    assert len(scan(root / "demo").splits["train"]) == 2  # alone it is used


def test_demo_tree_alone_below_data_is_not_taken_for_real_data(tmp_path):
    demo_data.make_demo(tmp_path / "data" / "demo", count=2, seed=0)
    found = scan(tmp_path / "data")
    assert found.pair_count() == 0
    assert "generated demo data" in reasons(found.skipped)[tmp_path / "data" / "demo"]


# ---------------------------------------------------------------------------- split

def drawn_tree(root, count=20):
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(*range(count)))
    return scan(root)


def ids_of(splits):
    return {s: [p.id for p in pairs] for s, pairs in splits.items()}


def test_drawn_split_is_disjoint_complete_and_the_same_twice(tmp_path):
    found = drawn_tree(tmp_path / "a")
    first = split_pairs(found, seed=5, split_file=tmp_path / "one.json")
    second = split_pairs(found, seed=5, split_file=tmp_path / "two.json")
    assert ids_of(first) == ids_of(second)
    sizes = {s: len(v) for s, v in first.items()}
    assert sizes == {"train": 16, "valid": 2, "test": 2}
    all_ids = [i for ids in ids_of(first).values() for i in ids]
    assert sorted(all_ids) == isic_ids(*range(20))  # disjoint and complete
    other = split_pairs(found, seed=6, split_file=tmp_path / "three.json")
    assert ids_of(other) != ids_of(first)  # the seed matters


def test_split_is_saved_beside_the_data_and_reused(tmp_path):
    found = drawn_tree(tmp_path / "data")
    first = split_pairs(found, seed=1)
    assert (tmp_path / "data" / "split.json").exists()
    with pytest.warns(UserWarning, match="using the split saved in"):
        reused = split_pairs(found, seed=99, valid_fraction=0.5)  # the file wins, with a warning
    assert ids_of(reused) == ids_of(first)


def test_removed_or_added_pairs_raise_split_mismatch(tmp_path):
    root = tmp_path / "data"
    found = drawn_tree(root)
    split_pairs(found, seed=42)
    (root / IN18.format("Training") / "ISIC_0000003.jpg").unlink()
    with pytest.raises(SplitMismatch) as err:
        split_pairs(scan(root))
    message = str(err.value)
    assert "1 saved id(s) no longer on disk" in message
    assert str(root / "split.json") in message and "--redraw-split" in message
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(3, 50))
    with pytest.raises(SplitMismatch, match="1 pair\\(s\\) on disk not in it"):
        split_pairs(scan(root))


def test_official_validation_is_used_and_only_test_is_drawn(tmp_path):
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(*range(10)))
    write_isic(root, IN18.format("Validation"), GT18.format("Validation"), isic_ids(20, 21))
    splits = ids_of(split_pairs(scan(root), seed=42))
    assert splits["valid"] == isic_ids(20, 21)
    assert len(splits["test"]) == 1 and len(splits["train"]) == 9
    assert not set(splits["test"]) & set(splits["train"])


def test_the_command_line_says_whether_it_wrote_a_split_file(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("Training", "Validation", "Test"):  # official folders: nothing to draw
        write_isic(root, IN18.format(split), GT18.format(split),
                   isic_ids(*range(10 * len(split), 10 * len(split) + 3)))
    assert load_dataset.main(["--data", str(root)]) == 0
    written = capsys.readouterr().out.splitlines()[-1]
    assert written.startswith("split file: none (nothing to draw); memo of file checks: ")
    assert not (root / "split.json").exists()
    (root / "ISIC2018_Task1-2_Test_Input").rename(tmp_path / "elsewhere")  # test drawn now
    assert load_dataset.main(["--data", str(root)]) == 0  # no seed, no saved split: no draw
    assert capsys.readouterr().out.splitlines()[-1].startswith("split: none drawn yet")
    assert not (root / "split.json").exists()
    assert load_dataset.main(["--data", str(root), "--seed", "42"]) == 0
    written = capsys.readouterr().out.splitlines()[-1]
    assert written.startswith(f"split file: {root / 'split.json'}; memo of file checks: ")
    assert (root / "split.json").is_file()


@pytest.mark.parametrize("progress", [True, False])
def test_the_file_checks_show_a_bar_unless_told_not_to(tmp_path, monkeypatch, capsys, progress):
    monkeypatch.setattr(load_dataset, "POOL_MIN_FILES", 0)  # the pool (and its bar) for 4 files
    monkeypatch.setattr(load_dataset.os, "cpu_count", lambda: 2)
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2))
    assert scan(root, progress=progress).pair_count() == 2
    assert ("checking files" in capsys.readouterr().err) == progress


def test_three_pairs_give_one_each(tmp_path):
    found = drawn_tree(tmp_path / "data", count=3)
    assert {s: len(v) for s, v in split_pairs(found, seed=42).items()} == {"train": 1, "valid": 1, "test": 1}


def test_work_dir_falls_back_to_home_cache_for_read_only_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "readonly"
    data.mkdir()
    assert load_dataset.work_dir(data) == data
    data.chmod(0o555)
    try:
        digest = hashlib.sha1(str(data.absolute()).encode()).hexdigest()[:12]
        expected = tmp_path / "home" / ".cache" / "melanoma-seg" / digest
        assert load_dataset.work_dir(data) == expected and expected.is_dir()
    finally:
        data.chmod(0o755)


# ---------------------------------------------------------------------------- Dataset

def dark_fraction_iou(image, mask):
    dark = image.mean(0) < 0  # the lesion is far below the ImageNet mean, the skin above it
    truth = mask[0] > 0.5
    return (dark & truth).sum().item() / max((dark | truth).sum().item(), 1)


@pytest.fixture
def square_pair(tmp_path):
    image, mask = tmp_path / "images" / "sq.png", tmp_path / "masks" / "sq.png"
    write_pair(image, mask, 96, 96, box=(21, 30, 51, 69))  # edges on whole pixels at 64x64
    return Pair("sq", image, mask)


def test_dataset_yields_normalised_float_tensors_and_binary_masks(square_pair):
    image, mask, pair_id = SegmentationDataset([square_pair], (64, 64))[0]
    assert pair_id == "sq"
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert mask.dtype == torch.float32 and mask.shape == (1, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert image.min() < -1.0 and image.max() > 0.5  # normalised, not 0..255 or 0..1
    assert dark_fraction_iou(image, mask) > 0.95


def test_augmented_mask_still_lines_up_and_follows_epoch_and_index(square_pair):
    dataset = SegmentationDataset([square_pair], (64, 64), augment="full", seed=1)
    masks = []
    for epoch in range(6):
        image, mask, _ = dataset[(epoch, 0)]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert dark_fraction_iou(image, mask) > 0.85, f"epoch {epoch}"
        masks.append(mask)
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # augmentation does something
    dataset[(5, 0)]  # whatever came before, (epoch, index) alone decides
    assert torch.equal(dataset[(3, 0)][1], masks[3])


def dihedral_views(t):
    """The 8 flips and 90-degree turns of a CxHxW tensor."""
    turns = [torch.rot90(t, k, dims=(1, 2)) for k in range(4)]
    return turns + [torch.flip(v, dims=(2,)) for v in turns]


def test_flips_augmentation_only_flips_and_turns_image_and_mask_together(square_pair):
    plain = SegmentationDataset([square_pair], (64, 64))[0]
    dataset = SegmentationDataset([square_pair], (64, 64), augment="flips", seed=3)
    seen = set()
    for epoch in range(16):
        image, mask, _ = dataset[(epoch, 0)]
        # pixel for pixel one of the 8 views, the same one for the image and its mask
        match = [k for k, (im, m) in enumerate(zip(dihedral_views(plain[0]),
                                                    dihedral_views(plain[1])))
                 if torch.equal(im, image) and torch.equal(m, mask)]
        assert match, f"epoch {epoch}: not a flip or turn of the original"
        seen.add(match[0])
    assert len(seen) >= 4  # and it does vary
    with pytest.raises(ValueError, match="not one of"):
        SegmentationDataset([square_pair], (64, 64), augment="strong")


def test_persistent_workers_give_each_epoch_what_a_fresh_loader_gives(square_pair):
    """A resumed run starts fresh workers at epoch 3; a straight run's workers have lived
    through epochs 1 and 2. Both must load the same epoch 3."""
    pairs = [square_pair] * 6

    def loader():
        return load_dataset.make_loader(pairs, (64, 64), batch_size=3, train=True,
                                        options=load_dataset.LoaderOptions(workers=2, seed=7))
    straight = loader()
    epochs = []
    for epoch in (1, 2, 3):
        straight.sampler.set_epoch(epoch)
        epochs.append([batch[1] for batch in straight])
    fresh = loader()
    fresh.sampler.set_epoch(3)
    resumed = [batch[1] for batch in fresh]
    assert all(torch.equal(a, b) for a, b in zip(epochs[2], resumed))
    assert not all(torch.equal(a, b) for a, b in zip(epochs[1], epochs[2]))  # epochs differ
    first = epochs[0][0]
    assert not all(torch.equal(first[0], m) for m in first[1:])  # items differ within a batch


def test_cached_and_uncached_loading_agree(square_pair, tmp_path):
    from preprocess import PreprocessCache
    cache = PreprocessCache(tmp_path / ".cache", (64, 64))
    plain = SegmentationDataset([square_pair], (64, 64))[0]
    cached = SegmentationDataset([square_pair], (64, 64), cache=cache)[0]
    assert torch.equal(plain[1], cached[1]) and torch.allclose(plain[0], cached[0])


def test_file_gone_after_scan_is_skipped_with_a_warning(square_pair, tmp_path):
    gone = Pair("gone", tmp_path / "images" / "gone.jpg", square_pair.mask)
    dataset = SegmentationDataset([square_pair, gone], (64, 64))
    with pytest.warns(UserWarning, match="skipping .*gone.jpg"):
        item = dataset[1]
    assert item is None
    batch = load_dataset.collate_skip_none([dataset[0], None])
    assert batch[0].shape == (1, 3, 64, 64) and list(batch[2]) == ["sq"]
    assert load_dataset.collate_skip_none([None, None]) is None


# ---------------------------------------------------------------------------- real fixtures

def test_real_isic_fixture_pairs_scan_clean_and_load(tmp_path):
    data = tmp_path / "isic_sample"
    shutil.copytree(FIXTURES, data)  # the scan writes its cache beside the data
    found = scan(data)
    assert found.layout == "plain images/ + masks/"
    assert len(found.splits["train"]) == 12
    assert found.corrected == [] and found.skipped == []
    for image, mask, pair_id in SegmentationDataset(found.splits["train"], (256, 256)):
        original = cv2.imread(str(data / "masks" / f"{pair_id}_segmentation.png"),
                              cv2.IMREAD_UNCHANGED)
        assert image.shape == (3, 256, 256)
        assert mask.mean().item() == pytest.approx((original > 127).mean(), abs=1e-6)


# ---------------------------------------------------------------------------- demo data

def read_demo(root):
    pairs = []
    for image_path in sorted((root / IN18.format("Training")).glob("ISIC_*.jpg")):
        mask_path = root / GT18.format("Training") / f"{image_path.stem}_segmentation.png"
        pairs.append((image_path, mask_path))
    return pairs


def test_demo_is_deterministic_and_in_the_2018_layout(tmp_path):
    first = demo_data.make_demo(tmp_path / "one", count=5, seed=1)
    second = demo_data.make_demo(tmp_path / "two", count=5, seed=1)
    pairs_one, pairs_two = read_demo(first), read_demo(second)
    assert len(pairs_one) == 5
    for (i1, m1), (i2, m2) in zip(pairs_one, pairs_two):
        assert i1.read_bytes() == i2.read_bytes() and m1.read_bytes() == m2.read_bytes()
    other = read_demo(demo_data.make_demo(tmp_path / "three", count=5, seed=2))
    assert other[0][0].read_bytes() != pairs_one[0][0].read_bytes()
    found = scan(first)
    assert found.layout == "ISIC 2018 Task 1" and len(found.splits["train"]) == 5
    assert found.skipped == [] and found.corrected == []


def test_demo_masks_are_single_channel_0_255_and_lesions_vary_in_size(tmp_path):
    root = demo_data.make_demo(tmp_path / "demo", count=30, seed=0)
    fractions, widths, touching = [], [], 0
    for image_path, mask_path in read_demo(root):
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.ndim == 2 and mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) == {0, 255}
        fractions.append((mask > 0).mean())
        widths.append(image.shape[1])
        assert image.shape[0] != image.shape[1]
        edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        touching += bool(edge.any())
    assert 0.03 <= min(fractions) and max(fractions) <= 0.6
    assert max(fractions) - min(fractions) > 0.3
    assert min(widths) >= 600 and max(widths) > 1200
    assert 1 <= touching < 30


def test_demo_lesion_is_darker_than_the_skin_around_it(tmp_path):
    root = demo_data.make_demo(tmp_path / "demo", count=8, seed=0)
    for image_path, mask_path in read_demo(root):
        gray = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        lesion = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) > 0
        grown = cv2.dilate(lesion.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
        ring = grown & ~lesion
        assert gray[ring].mean() - gray[lesion].mean() > 20, image_path.name
        assert gray[lesion].std() > 5  # pigment is uneven, not one flat colour


# ---------------------------------------------------------------------------- command line

def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "load_dataset.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_on_an_empty_folder_exits_2_with_where_to_put_the_files(tmp_path):
    (tmp_path / "empty").mkdir()
    run = run_cli("--data", tmp_path / "empty")
    assert run.returncode == 2
    assert "ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg" in run.stderr
    assert "ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png" in run.stderr
    assert "python demo_data.py" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_cli_names_each_bad_file_and_counts_pairs_per_split(bad_tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(bad_tree[0], root)
    run = run_cli("--data", root, "--seed", 42)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Layout: ISIC 2018 Task 1" in out
    assert "train: 12 pairs" in out and "valid: 1 pair " in out and "test: 1 pair " in out
    assert "drawn from training" in out
    for path, why in {**bad_tree[2], **bad_tree[3]}.items():
        line = f"{path.relative_to(bad_tree[0])}: "
        assert line in out, f"{path.name} not named"
        assert why.replace(f"{bad_tree[0]}/", "") in out.split(line, 1)[1].splitlines()[0]
    assert "Traceback" not in run.stderr


def test_cli_makes_demo_where_asked(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "demo_data.py"), "--out", tmp_path / "demo",
                          "--count", "3", "--seed", "4"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert str(tmp_path / "demo") in run.stdout
    assert len(read_demo(tmp_path / "demo")) == 3


# ---------------------------------------------------------------------------- folds

def test_folds_validate_each_training_pair_once_never_a_test_pair_and_stay_put(tmp_path):
    root = tmp_path / "data"
    demo_data.make_demo(root, 23, 1)
    found = scan(root)
    splits = split_pairs(found, seed=42)
    pool = {p.id for p in splits["train"] + splits["valid"]}  # valid was drawn from training
    folds = [load_dataset.fold_splits(found, splits, 5, i, 42) for i in range(5)]
    validated = [p.id for f in folds for p in f["valid"]]
    assert sorted(validated) == sorted(pool)  # each exactly once
    for f in folds:
        assert {p.id for p in f["train"]} == pool - {p.id for p in f["valid"]}
        assert [p.id for p in f["test"]] == [p.id for p in splits["test"]]
        assert not {p.id for p in f["test"]} & (pool | {p.id for p in f["train"]})
    saved = json.loads(load_dataset.split_file_for(root).read_text())["folds"]
    assert saved["ids"] == [[p.id for p in f["valid"]] for f in folds]
    # a later run (a resume, test_model.py) reads the same folds from a fresh scan
    again = load_dataset.fold_splits(scan(root), split_pairs(scan(root)), 5, 3, 42)
    assert [p.id for p in again["valid"]] == [p.id for p in folds[3]["valid"]]
    with pytest.raises(SplitMismatch):
        load_dataset.fold_splits(found, splits, 5, 5, 42)


# ---------------------------------------------------------------------------- faults found in review

def upright_lesion(side=96, centre=(28, 28), radius=14):
    """A square skin image with one dark round lesion, and its mask, as a viewer shows them."""
    image = np.full((side, side, 3), (214, 168, 140), np.uint8)
    mask = cv2.circle(np.zeros((side, side), np.uint8), centre, radius, 255, -1)
    image[mask > 0] = (70, 45, 35)
    return image, mask


def save_turned(path, upright):
    """The upright picture stored turned a quarter, with EXIF orientation 6 to turn it back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, 1).copy()).save(path, quality=95, exif=exif.tobytes())


def test_a_square_exif_turned_image_is_decided_by_its_content(tmp_path):
    """A square image stored turned, with its mask drawn on the upright view: its shape cannot
    tell the turn, so the pair goes the way that puts the mask on the dark lesion; a lesion that
    looks the same both ways is skipped and said so, never trained on misaligned."""
    root = tmp_path / "data"
    images, masks = root / IN18.format("Training"), root / GT18.format("Training")
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    image, mask = upright_lesion()  # off centre: a quarter turn moves it
    save_turned(images / "ISIC_0000001.jpg", image)
    save_gray(masks / "ISIC_0000001_segmentation.png", mask)
    image, mask = upright_lesion(centre=(48, 48), radius=20)  # round and centred: no telling
    save_turned(images / "ISIC_0000002.jpg", image)
    save_gray(masks / "ISIC_0000002_segmentation.png", mask)
    found = scan(root)
    assert [(p.id, p.exif) for p in found.splits["train"]] == [("ISIC_0000001", True)]
    assert "applied, decided by content" in reasons(found.corrected)[images / "ISIC_0000001.jpg"]
    assert "its content cannot tell which" in reasons(found.skipped)[
        masks / "ISIC_0000002_segmentation.png"]
    loaded = preprocess.read_image(found.splits["train"][0].image, exif=True)
    dark = cv2.cvtColor(loaded, cv2.COLOR_RGB2GRAY) < 120
    assert (dark == (mask_of_first(root) > 0)).mean() > 0.98  # image and mask line up


def mask_of_first(root):
    return cv2.imread(str(root / GT18.format("Training") / "ISIC_0000001_segmentation.png"),
                      cv2.IMREAD_GRAYSCALE)


def test_an_interrupted_demo_generation_never_joins_a_scan_of_real_data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2, 3))
    real_encode, calls = cv2.imencode, []

    def encode_then_fail(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the generation
        return real_encode(*args)
    monkeypatch.setattr(demo_data.cv2, "imencode", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        demo_data.make_demo(root / "demo", count=10)
    assert not demo_data.is_complete(root / "demo")
    found = scan(root)
    assert sorted(p.id for p in found.splits["train"]) == isic_ids(1, 2, 3)
    assert reasons(found.skipped)[root / "demo"].startswith("generated demo data, left out")


def test_a_bug_in_the_checks_surfaces_instead_of_calling_the_file_unreadable(tmp_path,
                                                                              monkeypatch):
    root = tmp_path / "data"
    write_isic(root, IN18.format("Training"), GT18.format("Training"), isic_ids(1, 2))

    def buggy(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
    monkeypatch.setattr(load_dataset, "read_mask", buggy)
    with pytest.raises(TypeError, match="unsupported operand"):
        scan(root)
    monkeypatch.setattr(load_dataset, "read_mask", lambda *a, **k: (_ for _ in ()).throw(
        cv2.error("decoder gave up")))
    found = scan(root)  # what a decoder raises still makes the file unreadable, named
    assert all(why.startswith("unreadable mask: error") for path, why in found.skipped
               if path.suffix == ".png")


def test_importing_the_project_leaves_pillow_and_opencv_settings_alone():
    code = ("import cv2, PIL.Image as I; limit, threads = I.MAX_IMAGE_PIXELS, cv2.getNumThreads();"
            "import preprocess, load_dataset, test_model;"
            "print(I.MAX_IMAGE_PIXELS == limit, cv2.getNumThreads() == threads, threads > 1)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[:2] == ["True", "True"]


def test_a_process_that_starts_loader_workers_runs_opencv_on_one_thread(square_pair):
    """OpenCV's thread pool does not survive a fork: the parent goes to one thread first."""
    code = ("import cv2, numpy, load_dataset; from load_dataset import Pair, LoaderOptions;"
            "before = cv2.getNumThreads();"
            "cv2.GaussianBlur(numpy.zeros((3000, 3000), numpy.float32), (31, 31), 5);"  # pool up
            f"pair = Pair('x', {str(square_pair.image)!r}, {str(square_pair.mask)!r});"
            "load_dataset.make_loader([pair], (64, 64), 1);"
            "after_none = cv2.getNumThreads();"
            "batch = next(iter(load_dataset.make_loader([pair] * 2, (64, 64), 1, "
            "LoaderOptions(workers=1))));"
            "print(before > 1, after_none == before, cv2.getNumThreads(), len(batch[2]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["True", "True", "1", "1"]


def test_a_data_folder_pointed_at_its_images_folder_says_to_point_at_the_parent(tmp_path):
    root = tmp_path / "ph2"
    for i in (1, 2):
        write_pair(root / "images" / f"IMD00{i}.png", root / "masks" / f"IMD00{i}_segmentation.png")
    assert scan(root / "images").pair_count() == 0
    message = load_dataset.no_data_message(root / "images")
    assert message.endswith(f"Point --data at its parent, {root}, which holds both.")
    found = scan(root)
    assert found.pair_count() == 2 and found.sources == ["images"]


# What each AUGMENT name does, as it was when runs recorded it. A resumed run takes the name
# from its record: a changed behaviour is a new name in preprocess.AUGMENTS, never an edit here.
AUGMENT_BEHAVIOUR = {
    "flips": [("HorizontalFlip", 0.5, {}), ("VerticalFlip", 0.5, {}), ("RandomRotate90", 0.5, {})],
    "full": [("HorizontalFlip", 0.5, {}), ("VerticalFlip", 0.5, {}), ("RandomRotate90", 0.5, {}),
             ("Affine", 0.5, {"rotate": (-20.0, 20.0), "scale": {"x": (0.9, 1.1), "y": (0.9, 1.1)},
                              "translate_percent": {"x": (-0.05, 0.05), "y": (-0.05, 0.05)},
                              "interpolation": 1, "mask_interpolation": 0, "border_mode": 4}),
             ("RandomBrightnessContrast", 0.5, {"brightness_limit": (-0.15, 0.15),
                                                "contrast_limit": (-0.15, 0.15)}),
             ("HueSaturationValue", 0.5, {"hue_shift_limit": (-8.0, 8.0),
                                          "sat_shift_limit": (-15.0, 15.0),
                                          "val_shift_limit": (-10.0, 10.0)})],
}


def test_each_augment_name_keeps_what_it_does():
    assert set(preprocess.AUGMENTS) >= set(AUGMENT_BEHAVIOUR)
    for name, expected in AUGMENT_BEHAVIOUR.items():
        got = []
        for t, (_, _, keys) in zip(preprocess.train_augment((32, 32), strength=name).transforms,
                                   expected):
            init = t.get_transform_init_args()
            got.append((type(t).__name__, t.p, {k: init[k] for k in keys}))
        assert got == expected and len(preprocess.train_augment(
            (32, 32), strength=name).transforms) == len(expected), \
            f"AUGMENT {name!r} changed what it does: give the new behaviour a new name"
