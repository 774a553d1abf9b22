"""PACS: the official layout, splits, errors, the batched JiGen augmentation, download."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from conftest import PACS_SAMPLE, only_run_dir
from hydra.utils import instantiate

from calibrun import UserError
from calibrun.data import PACS, color_jitter, jigen_augment, random_crop_boxes, resized_crop
from calibrun.config import validate

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
IMAGE_SIZE = 32  # stored at round(32 * 227/222) = 33


def split_file(root: Path, domain: str, part: str) -> dict[str, int]:
    """{relative path: label 1-7} of one split file, read the obvious way."""
    lines = (root / f"{domain}_{part}_kfold.txt").read_text().split("\n")
    return {path: int(label) for path, label in (line.split() for line in lines if line.strip())}


def all_paths(root: Path) -> list[str]:
    """Every image of the dataset, sorted: ``Split.index`` points into this list."""
    return sorted(p for d in DOMAINS for p in split_file(root, d, "test"))


def make(root: Path, tmp_path: Path, **kwargs) -> PACS:
    return PACS(root=str(root), image_size=IMAGE_SIZE, cache_dir=str(tmp_path / "cache"), **kwargs)


@pytest.fixture
def mini_copy(tmp_path) -> Path:
    """A writable copy of the bundled PACS sample, to break on purpose."""
    return Path(shutil.copytree(PACS_SAMPLE, tmp_path / "PACS"))


# --------------------------------------------------------------------------- splits


def test_official_split_holds_out_the_target_domain(tmp_path):
    data = make(PACS_SAMPLE, tmp_path, target="sketch")
    splits = data.splits()
    paths = all_paths(PACS_SAMPLE)
    names = {s: [paths[i] for i in splits[s].index.tolist()] for s in splits}
    assert {p.split("/")[0] for p in names["train"] + names["val"]} == {"art_painting", "cartoon", "photo"}
    assert sorted(names["test"]) == sorted(split_file(PACS_SAMPLE, "sketch", "test")) and len(names["test"]) == 10
    sources = ("art_painting", "cartoon", "photo")
    assert sorted(names["train"]) == sorted(p for d in sources for p in split_file(PACS_SAMPLE, d, "train"))
    assert sorted(names["val"]) == sorted(p for d in sources for p in split_file(PACS_SAMPLE, d, "crossval"))
    indices = [set(splits[s].index.tolist()) for s in ("train", "val", "test")]
    assert not (indices[0] & indices[1] or indices[0] & indices[2] or indices[1] & indices[2])
    # Labels are the file's label − 1, on the fixed 7-class index, though art_painting has no house.
    labels = {p: lab for d in DOMAINS for p, lab in split_file(PACS_SAMPLE, d, "test").items()}
    for s, split in splits.items():
        assert split.labels.tolist() == [labels[p] - 1 for p in names[s]]
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 33, 33)
    assert data.num_classes == 7
    assert not any(p.startswith("art_painting/house/") for p in paths)
    assert 5 in splits["train"].labels.tolist()  # house, from cartoon or photo
    assert set(torch.cat([s.labels for s in splits.values()]).tolist()) <= set(range(7))
    assert len(list((tmp_path / "cache").glob("pacs-*.pt"))) == 1
    again = make(PACS_SAMPLE, tmp_path, target="sketch").splits()
    assert torch.equal(again["test"].images, splits["test"].images)


def test_random_split_is_disjoint_and_seeded(tmp_path):
    splits = make(PACS_SAMPLE, tmp_path, target="photo", split="random", val_fraction=0.2).splits()
    paths = all_paths(PACS_SAMPLE)
    train, val, test = (set(splits[s].index.tolist()) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(val) == 6 and len(train) == 24
    assert {paths[i].split("/")[0] for i in train | val} == {"art_painting", "cartoon", "sketch"}
    assert {paths[i] for i in test} == set(split_file(PACS_SAMPLE, "photo", "test"))
    same = make(PACS_SAMPLE, tmp_path, target="photo", split="random", val_fraction=0.2).splits()
    assert torch.equal(same["val"].index, splits["val"].index)
    others = [make(PACS_SAMPLE, tmp_path, target="photo", split="random", val_fraction=0.2, split_seed=s).splits()
              for s in (1, 2)]
    assert any(not torch.equal(o["val"].index, splits["val"].index) for o in others)


@pytest.mark.parametrize("target", DOMAINS)
def test_jigen_split_holds_out_a_seeded_fraction_of_each_source_domain(tmp_path, target):
    """JiGen's protocol: floor(0.3 · 10) = 3 of each source domain's 10 images for val."""
    splits = make(PACS_SAMPLE, tmp_path, target=target, split="jigen", val_fraction=0.3).splits()
    paths = all_paths(PACS_SAMPLE)
    train, val, test = ({paths[i] for i in splits[s].index.tolist()} for s in ("train", "val", "test"))
    sources = [d for d in DOMAINS if d != target]
    assert sorted(p.split("/")[0] for p in val) == sorted(sources * 3)
    assert not train & val and train | val == {p for d in sources for p in split_file(PACS_SAMPLE, d, "test")}
    assert test == set(split_file(PACS_SAMPLE, target, "test"))
    assert not any(p.startswith(f"{target}/") for p in train | val), "the target domain is never seen"
    again = make(PACS_SAMPLE, tmp_path, target=target, split="jigen", val_fraction=0.3).splits()
    assert torch.equal(again["val"].index, splits["val"].index)
    others = [make(PACS_SAMPLE, tmp_path, target=target, split="jigen", val_fraction=0.3, split_seed=s).splits()
              for s in (1, 2)]
    assert any(not torch.equal(o["val"].index, splits["val"].index) for o in others)


def test_jigen_split_needs_no_split_files_and_refuses_an_empty_domain_hold_out(mini_copy, tmp_path):
    for f in mini_copy.glob("*.txt"):
        f.unlink()
    splits = make(mini_copy, tmp_path, target="sketch", split="jigen").splits()
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (27, 3, 10)
    with pytest.raises(UserError, match=r"val_fraction=0.05 leaves no train or no val image of the 10 art_painting"):
        make(mini_copy, tmp_path, target="sketch", split="jigen", val_fraction=0.05).splits()


def test_random_split_needs_only_the_image_folders(mini_copy, tmp_path):
    for f in mini_copy.glob("*.txt"):
        f.unlink()
    splits = make(mini_copy, tmp_path, target="sketch", split="random").splits()
    assert len(splits["test"]) == 10 and len(splits["train"]) + len(splits["val"]) == 30
    with pytest.raises(UserError, match=r"art_painting_train_kfold.txt is missing.*data.split=jigen or random"):
        make(mini_copy, tmp_path, target="sketch").splits()


def test_random_split_names_a_class_folder_pacs_does_not_have(mini_copy, tmp_path):
    for f in mini_copy.glob("*.txt"):
        f.unlink()
    (mini_copy / "kfold" / "cartoon" / "cat").mkdir()
    with pytest.raises(UserError, match=r"kfold/cartoon has class folders that are not PACS classes: \['cat'\]"):
        make(mini_copy, tmp_path, split="random").splits()


def test_subsets_are_stratified_subsets_of_their_split(tmp_path):
    full = make(PACS_SAMPLE, tmp_path, split="random", val_fraction=0.25).splits()
    splits = make(PACS_SAMPLE, tmp_path, split="random", val_fraction=0.25, train_subset=14).splits()
    assert len(splits["train"]) == 14 and set(splits["train"].index.tolist()) <= set(full["train"].index.tolist())
    assert set(splits["train"].labels.tolist()) == set(full["train"].labels.tolist())
    assert torch.equal(splits["val"].index, full["val"].index), "a subset never changes the hold-out"
    # Some sketch classes have a single image in the PACS sample: no stratified subset exists.
    with pytest.raises(UserError, match="data.test_subset=5"):
        make(PACS_SAMPLE, tmp_path, test_subset=5).splits()


# --------------------------------------------------------------------------- bad inputs


def test_unknown_domain_lists_the_valid_ones():
    with pytest.raises(UserError, match="paintings.*art_painting, cartoon, photo, sketch"):
        PACS(target="paintings")
    with pytest.raises(UserError, match="official, random, jigen"):
        PACS(split="kfold")
    with pytest.raises(UserError, match="7 classes"):
        PACS(num_classes=10)


def test_split_file_naming_a_missing_image(mini_copy, tmp_path):
    missing = next(iter(split_file(mini_copy, "cartoon", "train")))
    (mini_copy / "kfold" / missing).unlink()
    with pytest.raises(UserError, match=rf"cartoon_train_kfold.txt:\d+ names {missing}, but .* does not exist"):
        make(mini_copy, tmp_path).splits()


def test_label_outside_1_to_7_names_file_and_line(mini_copy, tmp_path):
    f = mini_copy / "photo_train_kfold.txt"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 9"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"photo_train_kfold.txt:3: label 9 is outside 1-7"):
        make(mini_copy, tmp_path).splits()


def test_unreadable_image_names_the_file(mini_copy, tmp_path):
    broken = next(iter(split_file(mini_copy, "sketch", "test")))
    (mini_copy / "kfold" / broken).write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"Cannot read image .*{broken}"):
        make(mini_copy, tmp_path).splits()


def test_missing_split_file_is_named(mini_copy, tmp_path):
    (mini_copy / "sketch_test_kfold.txt").unlink()
    with pytest.raises(UserError, match="sketch_test_kfold.txt is missing"):
        make(mini_copy, tmp_path).splits()


# --------------------------------------------------------------------------- augmentation


def test_every_sample_draws_its_own_crop_and_jitter():
    image = torch.randint(0, 256, (1, 3, 33, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = image.expand(16, -1, -1, -1)
    data = PACS(image_size=IMAGE_SIZE)
    out = data.train_transform(batch, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Normalised pixels of a [0, 255] image lie within ImageNet's (0 − mean)/std, (1 − mean)/std.
    lo = min((0 - m) / s for m, s in zip(PACS.mean, PACS.std))
    hi = max((1 - m) / s for m, s in zip(PACS.mean, PACS.std))
    assert lo - 1e-4 <= out.min() and out.max() <= hi + 1e-4
    flat = out.flatten(1)
    assert (torch.cdist(flat, flat) + torch.eye(16) > 1e-3).all(), "two samples got the same augmentation"
    again = data.train_transform(batch, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not torch.equal(out, data.train_transform(batch, torch.Generator().manual_seed(2)))


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    boxes = random_crop_boxes(4000, (33, 33), (0.8, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    assert ((w * h >= 0.8 - 1e-6) & (w * h <= 1 + 1e-6)).all()
    assert ((w / h >= 3 / 4 - 1e-6) & (w / h <= 4 / 3 + 1e-6)).all()
    assert len(set(boxes[:, 2].tolist())) > 3000, "boxes are drawn per sample"


def test_resized_crop_is_exact_on_pixel_boxes_and_flips():
    images = torch.randint(0, 256, (2, 3, 33, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = resized_crop(images, whole, torch.tensor([False, True]), 32)
    expected = F.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], expected[1].flip(-1))
    box = torch.tensor([[3 / 33, 5 / 33, 16 / 33, 16 / 33]])
    crop = resized_crop(images[:1], box, torch.tensor([False]), 16)
    torch.testing.assert_close(crop[0], images[0, :, 5:21, 3:19].float(), atol=1e-2, rtol=0)


def test_color_jitter_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 9, 9, generator=g)
    b, c, s = (0.6 + 0.8 * torch.rand(3, 16, generator=g)).unbind(0)
    hue = 0.8 * torch.rand(16, generator=g) - 0.4
    out = color_jitter(x, b, c, s, hue, bound=1.0)
    for i in range(16):
        ref = TF.adjust_brightness(x[i], b[i].item())
        ref = TF.adjust_contrast(ref, c[i].item())
        ref = TF.adjust_saturation(ref, s[i].item())
        ref = TF.adjust_hue(ref, hue[i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_about_one_in_ten_images_turns_gray():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4000, 3, 9, 9), dtype=torch.uint8, generator=g)
    out = jigen_augment(images, 8, g)  # unnormalised, in [0, 255]
    assert out.min() >= 0 and out.max() <= 255 + 1e-3
    gray = ((out - out.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1e-3).float().mean().item()
    assert 0.08 < gray < 0.12


def test_eval_transform_resizes_and_normalises():
    images = torch.randint(0, 256, (3, 3, 33, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = PACS(image_size=IMAGE_SIZE).eval_transform(images)
    resized = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(PACS.mean).view(1, 3, 1, 1), torch.tensor(PACS.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (resized / 255 - mean) / std)


# --------------------------------------------------------------------------- download


@pytest.fixture
def served_pacs(tmp_path, monkeypatch, local_server):
    """The PACS sample served on the loopback interface: the images as a zip of kfold/, the
    split files one by one, as the real download fetches them."""
    served = tmp_path / "served"
    with zipfile.ZipFile(served / "PACS.zip", "w") as zf:
        for f in sorted((PACS_SAMPLE / "kfold").rglob("*")):
            zf.write(f, f.relative_to(PACS_SAMPLE).as_posix())
    urls = {}
    for f in PACS_SAMPLE.glob("*_kfold.txt"):
        shutil.copy(f, served / f.name)
        urls[f.name] = f"{local_server}/{f.name}"
    monkeypatch.setattr(PACS, "archive_url", f"{local_server}/PACS.zip")
    monkeypatch.setattr(PACS, "split_urls", urls)
    return local_server


def test_download_from_a_local_server(tmp_path, monkeypatch, served_pacs):
    root = tmp_path / "data" / "PACS"
    splits = make(root, tmp_path, download=True).splits()
    assert (root / "kfold" / "sketch").is_dir() and (root / "photo_crossval_kfold.txt").is_file()
    assert not (root / "PACS.zip").exists(), "the archive is removed once extracted"
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 6, 10]
    # Present data is not fetched again: a dead URL no longer matters.
    monkeypatch.setattr(PACS, "archive_url", f"{served_pacs}/missing/PACS.zip")
    assert len(make(root, tmp_path, download=True).splits()["test"]) == 10


def test_download_failure_says_what_to_get_and_where(tmp_path, monkeypatch, served_pacs):
    url = f"{served_pacs}/missing/PACS.zip"
    monkeypatch.setattr(PACS, "archive_url", url)
    root = tmp_path / "data" / "PACS"
    with pytest.raises(UserError) as err:
        make(root, tmp_path, download=True).splits()
    message = str(err.value)
    assert f"the download of {url} failed" in message and str(root.resolve()) in message
    assert "kfold/<domain>/<class>/<image>" in message and "CALIBRUN_DATA" in message
    with pytest.raises(UserError, match="data.download=false"):
        make(tmp_path / "empty", tmp_path).splits()


# --------------------------------------------------------------------------- config and command line


def test_pacs_sample_config_reads_the_bundled_images_through_the_pacs_loader(compose_cfg, sample_cache):
    cfg = compose_cfg(["data=pacs_sample", f"data.image_size={IMAGE_SIZE}", "data.target=cartoon"])
    validate(cfg)
    assert cfg.data.root == str(PACS_SAMPLE) and cfg.data.cache_dir == str(sample_cache / "pacs_sample")
    data = instantiate(cfg.data)
    assert isinstance(data, PACS) and data.target == "cartoon" and data.num_classes == 7
    assert len(data.splits()["test"]) == 10
    assert list((sample_cache / "pacs_sample").glob("pacs-*.pt")), "the decode cache lives outside the package"


def test_cli_run_on_the_pacs_sample(run_cli, tmp_path):
    proc = run_cli([
        "data=pacs_sample", f"data.image_size={IMAGE_SIZE}",
        "model=resnet18", "model.stem=imagenet", "model.pretrained=false", "trainer=quick", "trainer.epochs=1",
        "trainer.batch_size=8", "trainer.progress=false", "metrics.resamples=100",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(only_run_dir(tmp_path) / "logits" / "test.npz") as f:
        assert len(f["labels"]) == 10 and f["logits"].shape == (10, 7)
    bad = run_cli(["data=pacs", "data.target=paintings", f"data.root={PACS_SAMPLE}"])
    output = bad.stdout + bad.stderr
    assert bad.returncode == 1 and "art_painting, cartoon, photo, sketch" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("breakage", ["missing_image", "label", "unreadable"])
def test_cli_exits_1_naming_the_broken_file(run_cli, mini_copy, tmp_path, breakage):
    if breakage == "missing_image":
        name = next(iter(split_file(mini_copy, "cartoon", "train")))
        (mini_copy / "kfold" / name).unlink()
        expected = name
    elif breakage == "label":
        f = mini_copy / "photo_train_kfold.txt"
        lines = f.read_text().splitlines()
        lines[2] = lines[2].rsplit(" ", 1)[0] + " 9"
        f.write_text("\n".join(lines) + "\n")
        expected = "photo_train_kfold.txt:3: label 9 is outside 1-7"
    else:
        name = next(iter(split_file(mini_copy, "sketch", "test")))
        (mini_copy / "kfold" / name).write_bytes(b"not an image")
        expected = name
    proc = run_cli(["data=pacs", f"data.root={mini_copy}", f"data.cache_dir={tmp_path / 'cache'}",
                    f"data.image_size={IMAGE_SIZE}", "model=resnet18", "trainer.progress=false"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and expected in output and "Traceback" not in output
