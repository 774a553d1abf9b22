"""Corrupted CIFAR releases and OOD sets: the official layouts read right, subsets, errors
that name the file, and the MD5-checked download from a local server."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_SAMPLE
from hydra.utils import instantiate
from omegaconf import OmegaConf
from shift_files import corrupt, sample_test_images, tar_of, write_cifar_c, write_svhn_mat

from calibrun import UserError
from calibrun.compose import config_dir
from calibrun.data import CIFAR, SVHN, CorruptedCIFAR, OtherTestSet

N = 40  # images per severity block in the test-made release


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_cifar_c(tmp_path_factory.mktemp("c") / "CIFAR-10-C", n=N)


def test_blocks_are_the_release_rows_of_each_severity(release):
    shift = CorruptedCIFAR(root=str(release), corruptions=["contrast", "fog"], severities=[2, 5])
    images, labels = sample_test_images(N)
    blocks = list(shift.sets())
    assert [(c, s) for c, s, _ in blocks] == [("contrast", 2), ("contrast", 5), ("fog", 2), ("fog", 5)]
    corruption, severity, split = blocks[1]
    expected = corrupt(images, "contrast", 5)  # rows 4·N..5·N of contrast.npy
    assert torch.equal(split.images, torch.from_numpy(expected).permute(0, 3, 1, 2))
    assert split.images.dtype == torch.uint8 and split.images.shape == (N, 3, 32, 32)
    assert split.labels.tolist() == labels.tolist() and split.index.tolist() == list(range(N))


def test_root_may_be_the_parent_and_the_default_corruptions_are_the_benchmark(release):
    shift = CorruptedCIFAR(root=str(release.parent), corruptions=["fog"])
    assert shift.folder == release and len(list(shift.sets())) == 5
    with pytest.raises(UserError, match=r"gaussian_noise.npy|shot_noise.npy"):
        next(CorruptedCIFAR(root=str(release)).sets())  # the 15 benchmark files are not all there


def test_subset_is_stratified_seeded_and_the_same_in_every_block(release):
    blocks = list(CorruptedCIFAR(root=str(release), corruptions=["fog", "contrast"], subset=20, subset_seed=3).sets())
    indices = {tuple(split.index.tolist()) for _, _, split in blocks}
    assert len(indices) == 1 and len(next(iter(indices))) == 20
    assert np.bincount(blocks[0][2].labels.numpy(), minlength=10).tolist() == [2] * 10
    other = next(CorruptedCIFAR(root=str(release), corruptions=["fog"], subset=20, subset_seed=4).sets())[2]
    assert not torch.equal(other.index, blocks[0][2].index)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "fog.npy").unlink(), r"fog.npy is missing.*shift.root"),
        (lambda r: (r / "labels.npy").unlink(), r"labels.npy is missing"),
        (lambda r: (r / "fog.npy").write_bytes(b"not an array"), r"fog.npy is not a readable .npy array"),
        (lambda r: np.save(r / "fog.npy", np.zeros((5 * N, 32, 32), np.uint8)), r"fog.npy holds uint8 \(200, 32, 32\)"),
        (lambda r: np.save(r / "labels.npy", np.arange(7)), r"labels.npy holds shape \(7,\)"),
        (lambda r: np.save(r / "labels.npy", np.arange(5 * N) % 7), r"labels.npy does not repeat"),
        (lambda r: np.save(r / "labels.npy", np.full(5 * N, 12)), r"labels.npy has labels outside 0-9"),
    ],
)
def test_broken_files_are_named(release, tmp_path, damage, message):
    broken = Path(shutil.copytree(release, tmp_path / "CIFAR-10-C"))
    damage(broken)
    with pytest.raises(UserError, match=message):
        list(CorruptedCIFAR(root=str(broken), corruptions=["fog"]).sets())


def test_bad_settings_list_what_is_allowed():
    with pytest.raises(UserError, match="unknown smog; allowed: gaussian_noise"):
        CorruptedCIFAR(corruptions=["smog"])
    with pytest.raises(UserError, match=r"shift.severities: \[6\] not among \[1, 2, 3, 4, 5\]"):
        CorruptedCIFAR(severities=[6])
    with pytest.raises(UserError, match="allowed: cifar10c, cifar100c"):
        CorruptedCIFAR(name="imagenetc")


def _serve(release: Path, local_server, served: Path) -> tuple[str, str]:
    archive = tar_of(release, served / "CIFAR-10-C.tar")
    return f"{local_server}/CIFAR-10-C.tar", hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_extracts_an_md5_checked_archive(release, local_server, tmp_path, monkeypatch):
    url, md5 = _serve(release, local_server, tmp_path / "served")
    monkeypatch.setitem(CorruptedCIFAR.releases, "cifar10c", {**CorruptedCIFAR.releases["cifar10c"], "url": url, "md5": md5})
    shift = CorruptedCIFAR(root=str(tmp_path / "data"), corruptions=["fog"], severities=[1], download=True)
    (_, _, split), = shift.sets()
    assert (tmp_path / "data" / "CIFAR-10-C" / "fog.npy").is_file() and len(split) == N


def test_a_wrong_checksum_names_the_archive(release, local_server, tmp_path, monkeypatch):
    url, _ = _serve(release, local_server, tmp_path / "served")
    monkeypatch.setitem(CorruptedCIFAR.releases, "cifar10c", {**CorruptedCIFAR.releases["cifar10c"], "url": url, "md5": "0" * 32})
    with pytest.raises(UserError, match=r"CIFAR-10-C.tar does not have the release's MD5 0{32}"):
        list(CorruptedCIFAR(root=str(tmp_path / "data"), corruptions=["fog"], download=True).sets())


def test_svhn_reads_the_official_mat_layout(tmp_path):
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", n=30)
    split = SVHN(root=str(tmp_path / "svhn")).split()
    assert split.images.shape == (30, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.tolist()[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 10 is the digit 0
    assert len(SVHN(root=str(tmp_path / "svhn"), subset=10).split()) == 10
    with pytest.raises(UserError, match=r"test_32x32.mat is missing.*ood.download=true"):
        SVHN(root=str(tmp_path / "none")).split()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable SVHN .mat file"):
        SVHN(root=str(tmp_path / "svhn")).split()


def test_the_test_set_of_another_dataset(tmp_path):
    cifar = CIFAR(root=str(CIFAR_SAMPLE), format="folder", val_size=500, cache_dir=str(tmp_path / "cache"))
    split = OtherTestSet(cifar, name="cifar10", subset=50).split()
    assert len(split) == 50 and split.images.shape[1:] == (3, 32, 32)


def _with_required_keys(node, tmp_path):
    """The config with each required key (``???``, e.g. shift=corrupted's root) set to an
    empty folder of its name."""
    for key in node:
        if OmegaConf.is_missing(node, key):
            node[key] = str(tmp_path / key)
    return node


@pytest.mark.parametrize("path", sorted(Path(config_dir()).glob("shift/*.yaml")) + sorted(Path(config_dir()).glob("ood/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shift_and_ood_config_builds(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBRUN_DATA", str(tmp_path))
    built = instantiate(_with_required_keys(OmegaConf.load(path), tmp_path))
    assert built.name == path.stem
    assert hasattr(built, "sets") or hasattr(built, "split")


@pytest.mark.parametrize("path", sorted(Path(config_dir()).glob("shift/*.yaml")) + sorted(Path(config_dir()).glob("ood/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_missing_evaluation_set_is_not_fetched_unasked_and_the_advice_names_its_keys(path, tmp_path, monkeypatch):
    """Offline, with nothing in the data folder: an error that names the keys of the
    ``shift``/``ood`` section the user sets (not the training data's ``data.*``)."""
    monkeypatch.setenv("CALIBRUN_DATA", str(tmp_path))
    node = _with_required_keys(OmegaConf.load(path), tmp_path)
    built = instantiate(node)
    with pytest.raises(UserError) as err:
        list(built.sets()) if hasattr(built, "sets") else built.split()
    message, section = str(err.value), path.parent.name
    assert f"{section}." in message, message
    # A set that can be downloaded says how; a folder made on this machine (shift=corrupted) cannot be.
    assert "download=true" in message or "download" not in node, message
    assert "data.root" not in message and "data.download" not in message, message
    assert "download failed" not in message  # download is false by default: nothing was fetched


def test_missing_cifar10_offline_points_at_the_bundled_sample(tmp_path):
    with pytest.raises(UserError, match="data=cifar10_sample, a sample of real CIFAR10 images bundled"):
        CIFAR(root=str(tmp_path), download=False).splits()
