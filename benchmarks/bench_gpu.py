"""Training-speed benchmark (``make bench-gpu``): one training epoch per model, three ways.

- calibrun: the training loop as a user runs it (``trainer.device=cuda`` and otherwise
  the default trainer: bf16 autocast, channels_last, data resident on the device), built
  from calibrun's own config with only the images swapped for random ones of the same
  shape: CIFAR-10's 45,000 32-px training images, or PACS-shaped 227-px images cropped to
  222 for three source domains (8,000).
- usual: what a user would otherwise write: the same model, batch and optimizer,
  torchvision transforms on PIL images in a ``DataLoader`` with worker processes
  (pinned memory, persistent workers), bf16 autocast. PACS gets JiGen's augmentation.
- bare: a loop over pre-made, already normalised batches on the device: the ceiling for
  the data side (same model settings as calibrun).

Each epoch is timed after a warm-up epoch, ``--repeats`` times (median, min–max). The
table gives images/s, the ratio to the usual pipeline, and the fraction of the GPU's bf16
peak that the model's arithmetic reaches (3 × forward FLOPs per image × images/s ÷ peak).
It is printed and written to ``--out`` as Markdown and CSV.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import ArrayDataset  # noqa: E402

from calibrun import train  # noqa: E402
from calibrun.compose import config_dir  # noqa: E402
from calibrun.config import build_component, validate  # noqa: E402
from calibrun.data import CIFAR, PACS, Split  # noqa: E402
from calibrun.duration import DurationEstimate  # noqa: E402

# name: (the calibrun overrides that pick the model, the data it trains on)
SETUPS = {
    "resnet110": (["model=resnet110"], "cifar"),
    "resnet20": (["model=resnet110", "model.depth=20"], "cifar"),
    "resnet18": (["model=resnet18"], "cifar"),
    "resnet18_pacs": (["model=resnet18", "model.stem=imagenet"], "pacs"),
}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched against
# torch.cuda.get_device_name() in this order (PCIe and NVL before the SXM default).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0))
BATCH = 128


def shaped_cifar(n_train: int, n_val: int, seed: int = 0) -> CIFAR:
    """calibrun's CIFAR-10 dataset (its transforms and statistics) serving random 32-px
    images: the benchmark's ``data`` component."""
    data = CIFAR()
    data.splits = lambda: random_splits((n_train, n_val, n_val), 32, data.num_classes, seed)
    return data


def shaped_pacs(n_train: int, n_val: int, image_size: int = 222, seed: int = 0) -> PACS:
    """calibrun's PACS dataset (JiGen's augmentation on the device) serving random images
    stored at PACS's 227/222 of ``image_size``, as its decode cache holds them."""
    data = PACS(image_size=image_size)
    stored = round(image_size * 227 / 222)
    data.splits = lambda: random_splits((n_train, n_val, n_val), stored, data.num_classes, seed)
    return data


def random_splits(sizes: tuple[int, int, int], size: int, classes: int, seed: int) -> dict[str, Split]:
    g = torch.Generator().manual_seed(seed)
    return {name: Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.arange(n) % classes, torch.arange(n))
            for name, n in zip(("train", "val", "test"), sizes)}


def benchmark_config(setup: str, args: argparse.Namespace) -> DictConfig:
    """calibrun's config for ``setup`` as a user composes it, with the shaped data."""
    model_overrides, kind = SETUPS[setup]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=cifar10" if kind == "cifar" else "data=pacs", *model_overrides, f"trainer.device={args.device}",
            f"trainer.batch_size={BATCH}", "trainer.progress=false", "calibrator=[temperature]"])
    builder = shaped_cifar if kind == "cifar" else shaped_pacs
    data = {"_target_": f"{builder.__module__}.{builder.__name__}", "n_train": args.images, "n_val": BATCH}
    if kind == "pacs":
        data.update(n_train=args.pacs_images, image_size=args.pacs_image_size)
    with open_dict(cfg):
        cfg.data = OmegaConf.create(data)
        cfg.model.num_classes = 10 if kind == "cifar" else 7
    return validate(cfg)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epochs(run_epoch: Callable[[int], None], repeats: int, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` epochs after one untimed warm-up epoch (cuDNN autotuning,
    allocator, worker start-up)."""
    seconds = []
    for epoch in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        run_epoch(epoch)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def calibrun_times(cfg: DictConfig, repeats: int, run_dir: Path) -> list[float]:
    """calibrun's own training epoch (``train.train_epoch``), built by ``train.prepare``."""
    tr, _, _ = train.prepare(cfg, run_dir)
    progress = train.Progress()
    # Nothing left to estimate: the benchmark times the epochs itself, without the
    # estimate's two synchronisations.
    no_estimate = DurationEstimate(batches_left=0, batches_per_epoch=len(tr.train_loader), synchronize=lambda: None)
    with train.SignalFlag(defer=True) as flag:
        return timed_epochs(lambda epoch: train.train_epoch(tr, epoch, progress, flag, None, no_estimate), repeats,
                            tr.train_loader.device)


def usual_transform(kind: str, image_size: int) -> transforms.Compose:
    """The torchvision pipeline a user writes: pad-crop-flip for CIFAR, JiGen's for PACS."""
    if kind == "cifar":
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        mean, std = CIFAR.mean, CIFAR.std
    else:
        steps = [transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0)), transforms.RandomHorizontalFlip(),
                 transforms.ColorJitter(0.4, 0.4, 0.4, 0.4), transforms.RandomGrayscale(0.1)]
        mean, std = PACS.mean, PACS.std
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def new_model(cfg: DictConfig, device: torch.device, channels_last: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_component(cfg.model, "model").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = cfg.trainer
    return model.train(), torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def usual_times(cfg: DictConfig, split: Split, kind: str, args: argparse.Namespace) -> list[float]:
    """The same model trained from a DataLoader of PIL images with torchvision transforms."""
    device = torch.device(args.device)
    model, optimizer = new_model(cfg, device, channels_last=False)
    dataset = ArrayDataset(split.images.permute(0, 2, 3, 1).numpy(), split.labels.numpy(),
                           usual_transform(kind, cfg.data.get("image_size", 32)))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

    def epoch(_: int) -> None:
        for x, y in loader:
            sgd_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True))

    return timed_epochs(epoch, args.repeats, device)


def bare_times(cfg: DictConfig, split: Split, data: object, args: argparse.Namespace) -> list[float]:
    """Pre-made normalised batches already on the device: no augmentation, no copies."""
    device = torch.device(args.device)
    channels_last = device.type == "cuda" and cfg.trainer.channels_last
    model, optimizer = new_model(cfg, device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batches = [(data.eval_transform(split.images[i:i + BATCH].to(device)).contiguous(memory_format=fmt),
                split.labels[i:i + BATCH].to(device)) for i in range(0, len(split) - BATCH + 1, BATCH)]
    return timed_epochs(lambda _: [sgd_step(model, optimizer, x, y) for x, y in batches], args.repeats, device)


def forward_flops_per_image(cfg: DictConfig, size: int) -> float:
    """FLOPs of one forward pass per image (torch's FLOP counter, batch 2, on the CPU)."""
    model = build_component(cfg.model, "model").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(2, 3, size, size))
    return counter.get_total_flops() / 2


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as ``torch.cuda.get_device_name`` names it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def rows_for(setup: str, times: dict[str, list[float]], images: int, flops: float, peak: float | None) -> list[dict]:
    """One table row per pipeline: epoch seconds (median, min, max), images/s, ratios."""
    usual = statistics.median(times["usual"])
    rows = []
    for pipeline, seconds in times.items():
        median = statistics.median(seconds)
        per_s = images / median
        rows.append({"model": setup, "pipeline": pipeline, "epoch_s": round(median, 3),
                     "epoch_s_min": round(min(seconds), 3), "epoch_s_max": round(max(seconds), 3),
                     "images": images, "images_per_s": round(per_s, 1), "speedup_vs_usual": round(usual / median, 2),
                     "gflops_per_image_fwd": round(flops / 1e9, 3),
                     "pct_bf16_peak": round(100 * 3 * flops * per_s / (peak * 1e12), 2) if peak else None})
    return rows


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:OVERRIDE OVERRIDE...`` (``--variant``) as the row name and trainer overrides."""
    name, _, overrides = text.partition(":")
    if not name or not overrides.split():
        raise ValueError(f"--variant {text!r}: write NAME:key=value [key=value ...]")
    return f"calibrun {name}", overrides.split()


def bench_setup(setup: str, args: argparse.Namespace, peak: float | None) -> list[dict]:
    cfg = benchmark_config(setup, args)
    kind = SETUPS[setup][1]
    data = build_component(cfg.data, "data")
    split = data.splits()["train"]
    size = cfg.data.get("image_size", 32)
    print(f"{setup}: {len(split)} images of {tuple(split.images.shape[1:])}, batch {BATCH}", flush=True)
    times = {"calibrun": calibrun_times(cfg, args.repeats, args.out / "runs" / setup)}
    for name, overrides in map(parse_variant, args.variant):
        variant = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        times[name] = calibrun_times(validate(variant), args.repeats, args.out / "runs" / f"{setup}-{name[9:]}")
    times.update(usual=usual_times(cfg, split, kind, args), bare=bare_times(cfg, split, data, args))
    images = (len(split) // BATCH) * BATCH  # every pipeline drops the last partial batch
    return rows_for(setup, times, images, forward_flops_per_image(cfg, size), peak)


def machine_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return (f"{name}; torch {torch.__version__}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}")
    parser.add_argument("--images", type=int, default=45_000, help="CIFAR-shaped training images")
    parser.add_argument("--pacs-images", type=int, default=8_000, help="PACS-shaped training images")
    parser.add_argument("--pacs-image-size", type=int, default=222)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline, after one warm-up")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (usual)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                        help="another calibrun row with these config overrides, e.g. "
                             "'graphs:trainer.compile=true trainer.compile_mode=reduce-overhead' (repeatable)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in SETUPS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(SETUPS)}")
    device = torch.device(args.device)
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    rows = [row for setup in args.models.split(",") for row in bench_setup(setup, args, peak)]
    table = pd.DataFrame(rows)
    header = (f"# Training epoch: calibrun against the usual pipeline\n\nMachine: {machine_line(device)}. "
              f"Batch {BATCH}, bf16 autocast on CUDA, {args.workers} DataLoader workers (usual), "
              f"{args.repeats} timed epochs after a warm-up (median, min–max); bf16 peak "
              f"{f'{peak:g} TFLOP/s' if peak else 'unknown'}.\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "bench_gpu.csv", index=False)
    (args.out / "bench_gpu.md").write_text(header + table.to_markdown(index=False) + "\n")
    print(header + table.to_markdown(index=False))
    print(f"\nWritten: {args.out / 'bench_gpu.md'}, {args.out / 'bench_gpu.csv'}")
    return table


if __name__ == "__main__":
    main()
