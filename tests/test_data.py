import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from conftest import CIFAR_SAMPLE, PACS_SAMPLE
from hydra.utils import instantiate
from PIL import Image

from calibrun import UserError
from calibrun.data import CIFAR, PACS, DeviceLoader, Split, Synthetic, make_splits, random_crop_flip
from calibrun.commands.pack import main as pack_main


def _candidates(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop-and-flip of one image, built the slow, obvious way."""
    _, h, w = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    crops = [padded[:, y:y + h, x:x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_random_crop_flip_outputs_are_crops_of_their_own_input():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = random_crop_flip(images, pad=2, generator=g)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    chosen = []
    for img, o in zip(images, out):
        matches = [i for i, c in enumerate(_candidates(img, 2)) if torch.equal(c, o)]
        assert matches, "output is not a crop/flip of its input"
        chosen.append(matches[0])
    # Per-sample parameters: a batch of 64 does not share one crop.
    assert len(set(chosen)) > 20
    flipped = sum(c >= 25 for c in chosen)
    assert 10 < flipped < 54


def test_val_split_is_stratified_disjoint_and_independent_of_training_seed():
    labels = torch.arange(1000) % 10
    images = torch.zeros(1000, 3, 4, 4, dtype=torch.uint8)
    test = torch.zeros(200, 3, 4, 4, dtype=torch.uint8), torch.arange(200) % 10
    a = make_splits(images, labels, *test, val_size=100, split_seed=3, train_subset=200, test_subset=50)
    b = make_splits(images, labels, *test, val_size=100, split_seed=3)
    assert torch.equal(a["val"].index, b["val"].index), "train_subset must not change the hold-out"
    assert np.bincount(a["val"].labels.numpy()).tolist() == [10] * 10
    assert np.bincount(a["train"].labels.numpy()).tolist() == [20] * 10
    assert np.bincount(a["test"].labels.numpy()).tolist() == [5] * 10
    assert not set(a["val"].index.tolist()) & set(b["train"].index.tolist())
    assert len(b["train"]) + len(b["val"]) == 1000
    c = make_splits(images, labels, *test, val_size=100, split_seed=4)
    assert not torch.equal(b["val"].index, c["val"].index)


def test_subset_too_small_for_stratification_is_a_user_error():
    labels = torch.arange(100) % 10
    images = torch.zeros(100, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(UserError, match="data.train_subset"):
        make_splits(images, labels, images, labels, val_size=20, split_seed=0, train_subset=5)


def test_device_loader_covers_split_and_repeats_per_epoch():
    data = Synthetic(train_size=100)
    split = data.splits()["train"]
    loader = DeviceLoader(split, 32, torch.device("cpu"), data.train_transform, shuffle=True, seed=1)
    assert len(loader) == 4
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())
    first = [x for x, _ in loader]
    again = [x for x, _ in loader]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    loader.set_epoch(1)
    assert not torch.equal(first[0], next(iter(loader))[0])
    x = first[0]
    assert x.dtype == torch.float32 and x.shape == (32, 3, 16, 16)
    loader.drop_last = True
    assert len(loader) == 3


def test_eval_transform_normalises_with_dataset_statistics():
    data = CIFAR()
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = data.eval_transform(x)
    expected = [(1 - m) / s for m, s in zip(CIFAR.mean, CIFAR.std)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))


def test_augment_false_trains_on_the_images_as_they_are():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    plain = CIFAR(augment=False)
    torch.testing.assert_close(plain.train_transform(images, torch.Generator().manual_seed(0)), plain.eval_transform(images))
    augmented = CIFAR().train_transform(images, torch.Generator().manual_seed(0))
    assert not torch.equal(augmented, plain.eval_transform(images))


def test_folder_format_reads_the_cifar_sample_and_caches_decoded_images(tmp_path):
    data = CIFAR(root=str(CIFAR_SAMPLE), format="folder", val_size=500, train_subset=300, test_subset=100,
                 cache_dir=str(tmp_path / "cache"))
    splits = data.splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 500, 100]
    assert splits["train"].images.shape[1:] == (3, 32, 32) and splits["train"].images.dtype == torch.uint8
    assert sorted(set(splits["test"].labels.tolist())) == list(range(10))
    cached = list((tmp_path / "cache").glob("folder-*.pt"))
    assert len(cached) == 1
    again = data.splits()
    assert torch.equal(again["val"].images, splits["val"].images)


def _image_folder(root: Path, bad: bool = False) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(d / f"{i}.png")
    if bad:
        (root / "train" / "a" / "broken.jpg").write_bytes(b"not an image")


def test_packed_format_gives_the_folders_images_bit_for_bit_through_a_cache(tmp_path):
    """calibrun-pack copies the JPEG bytes unchanged, so data.format=packed decodes to
    exactly what data.format=folder decodes, and a second load reads the cache."""
    pack = tmp_path / "cifar10-sample.npz"
    assert pack_main([str(CIFAR_SAMPLE), str(pack)]) == 0
    encoded = sum(p.stat().st_size for p in CIFAR_SAMPLE.rglob("*.jpg"))
    assert encoded < pack.stat().st_size < encoded + 200_000  # the bytes as they are, plus small arrays
    folder = CIFAR(root=str(CIFAR_SAMPLE), format="folder", val_size=500, cache_dir=str(tmp_path / "a")).splits()
    packed_data = CIFAR(root=str(pack), format="packed", val_size=500)
    packed = packed_data.splits()
    for split in ("train", "val", "test"):
        assert torch.equal(folder[split].images, packed[split].images)
        assert torch.equal(folder[split].labels, packed[split].labels)
    assert packed_data.classes == sorted(p.name for p in (CIFAR_SAMPLE / "train").iterdir())
    assert len(list((tmp_path / ".calibrun_cache").glob("packed-*.pt"))) == 1  # beside the pack
    assert torch.equal(packed_data.splits()["test"].images, packed["test"].images)


@pytest.mark.parametrize("content, message", [(None, "is not a file"), (b"not a zip", "Cannot read packed"),
                                              ("arrays", "not a packed dataset")])
def test_a_missing_or_foreign_packed_file_is_one_line(tmp_path, content, message):
    pack = tmp_path / "p.npz"
    if content == "arrays":
        np.savez(pack, labels=np.zeros(3))
    elif content is not None:
        pack.write_bytes(content)
    with pytest.raises(UserError, match=message):
        CIFAR(root=str(pack), format="packed").splits()


def test_unreadable_image_names_the_file(tmp_path):
    _image_folder(tmp_path / "imgs", bad=True)
    data = CIFAR(root=str(tmp_path / "imgs"), format="folder", num_classes=2, val_size=2, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="broken.jpg"):
        data.splits()


def test_wrong_number_of_class_folders_is_explained(tmp_path):
    _image_folder(tmp_path / "imgs")
    with pytest.raises(UserError, match="2 class folders but data.num_classes=10"):
        CIFAR(root=str(tmp_path / "imgs"), format="folder", num_classes=10).splits()


def test_test_folder_with_a_class_the_training_folder_lacks_is_named(tmp_path):
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "test" / "c").mkdir()
    with pytest.raises(UserError, match=r"imgs/test has class folders not in the training set: \['c'\]"):
        CIFAR(root=str(tmp_path / "imgs"), format="folder", num_classes=2, val_size=2).splits()


def _expected_cache_name(prefix: str, files: dict[str, list[tuple[Path, int]]], size: int | None = None) -> str:
    """The decode-cache file name as earlier releases wrote it, spelled out here so that
    a change to it, which would orphan every existing cache, fails a test."""
    digest = hashlib.sha1()
    if size is not None:
        digest.update(f"size={size}\n".encode())
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            digest.update(f"{split}|{path.resolve()}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{prefix}-{digest.hexdigest()[:16]}.pt"


def test_folder_decode_cache_keeps_its_file_name(tmp_path):
    _image_folder(tmp_path / "imgs")
    CIFAR(root=str(tmp_path / "imgs"), format="folder", num_classes=2, val_size=2).splits()
    # Classes in sorted folder order, files in sorted name order, train before test.
    files = {
        split: [(tmp_path / "imgs" / split / cls / f"{i}.png", label)
                for label, cls in enumerate("ab") for i in range(6)]
        for split in ("train", "test")
    }
    cached = [p.name for p in (tmp_path / "imgs" / ".calibrun_cache").glob("*.pt")]
    assert cached == [_expected_cache_name("folder", files)]


def test_pacs_decode_cache_keeps_its_file_name(tmp_path):
    PACS(root=str(PACS_SAMPLE), image_size=32, cache_dir=str(tmp_path)).splits()
    # The cache holds the whole dataset, every image of the four test files, sorted.
    labels = {}
    for f in PACS_SAMPLE.glob("*_test_kfold.txt"):
        lines = [line.split() for line in f.read_text().splitlines() if line.strip()]
        labels.update((rel, int(label) - 1) for rel, label in lines)
    files = {"pacs": [(PACS_SAMPLE / "kfold" / rel, labels[rel]) for rel in sorted(labels)]}
    assert [p.name for p in tmp_path.glob("*.pt")] == [_expected_cache_name("pacs", files, size=33)]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar_archive(tmp_path: Path, monkeypatch, base_url: str) -> Path:
    """A tiny archive in CIFAR-10's python format, served by ``base_url`` with its real
    MD5 checks (torchvision's download code runs unchanged)."""
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_list = []
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(20)]}
        (src / name).write_bytes(pickle.dumps(batch))
        train_list.append([name, _md5(src / name)])
    (src / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    monkeypatch.setattr(tvd.CIFAR10, "url", f"{base_url}/{archive.name}")
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", _md5(archive))
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list[:5])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", train_list[5:])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": _md5(src / "batches.meta")})
    return archive


def test_torchvision_download_from_a_local_server(tmp_path, monkeypatch, local_server):
    _fake_cifar_archive(tmp_path, monkeypatch, local_server)
    data = CIFAR(root=str(tmp_path / "root"), download=True, val_size=20)
    splits = data.splits()
    assert (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [80, 20, 20]
    assert splits["test"].images.shape == (20, 3, 32, 32)


def test_download_failure_says_where_data_must_go(tmp_path, monkeypatch, local_server):
    # The server answers 404: as far as the download code can tell, the data is unreachable.
    monkeypatch.setattr(tvd.CIFAR10, "url", f"{local_server}/missing/cifar-10-python.tar.gz")
    with pytest.raises(UserError) as err:
        CIFAR(root=str(tmp_path / "root"), download=True).splits()
    message = str(err.value)
    assert "download failed" in message and str((tmp_path / "root").resolve()) in message
    with pytest.raises(UserError, match="data.download=false"):
        CIFAR(root=str(tmp_path / "root"), download=False).splits()


def test_synthetic_is_deterministic_and_balanced():
    a, b = Synthetic().splits(), Synthetic().splits()
    assert torch.equal(a["train"].images, b["train"].images)
    assert isinstance(a["val"], Split) and len(a["test"]) == 256


def test_subset_as_large_as_the_split_keeps_it_whole():
    labels = torch.arange(100) % 10
    images = torch.zeros(100, 3, 4, 4, dtype=torch.uint8)
    splits = make_splits(images, labels, images[:50], labels[:50], val_size=20, split_seed=0,
                         train_subset=80, test_subset=500)
    assert len(splits["train"]) == 80 and len(splits["test"]) == 50


def test_cifar10_sample_config_is_the_folder_loader_on_the_bundled_images(compose_cfg, sample_cache):
    cfg = compose_cfg(["data=cifar10_sample"])
    assert cfg.data.root == str(CIFAR_SAMPLE) and cfg.data.cache_dir == str(sample_cache / "cifar10_sample")
    data = instantiate(cfg.data)
    assert type(data) is CIFAR and data.format == "folder"
    splits = data.splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4500, 500, 1000]
    # Folders sort into CIFAR-10's own class order, so label k means the same class in
    # the sample and in the official release.
    classes = sorted(p.name for p in (CIFAR_SAMPLE / "train").iterdir())
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split in splits.values():
        assert torch.bincount(split.labels, minlength=10).tolist() == [len(split) // 10] * 10
    # The first test image is the first JPEG of the first class, decoded by PIL directly.
    first = np.array(Image.open(CIFAR_SAMPLE / "test" / "airplane" / "0000.jpg").convert("RGB"))
    assert torch.equal(splits["test"].images[0], torch.from_numpy(first).permute(2, 0, 1))
