"""A fidelity fixture for calibrun's image corruptions, made by running the reference
implementation of Hendrycks & Dietterich (2019) on a few sample images.

    python benchmarks/corrupt_reference.py \\
        --robustness /work/.mirror/hendrycks+robustness/repo \\
        --imagecorruptions /tmp/ic/imagecorruptions/corruptions.py \\
        --out tests/fixtures/corrupt_reference.npz

``--robustness`` is a git directory (a bare mirror is fine) of github.com/hendrycks/robustness.
From its HEAD the script extracts, to a temporary directory, the two reference recipes,
``ImageNet-C/create_c/make_cifar_c.py`` ("cifar", 32×32) and
``ImageNet-C/imagenet_c/imagenet_c/corruptions.py`` ("imagenet", 224×224), and their frost
images; nothing of the reference is copied into this repository. Each recipe is loaded by
executing only its imports, its ``warnings.simplefilter`` call and its function and class
definitions (an AST filter), never make_cifar_c.py's script part that reads CIFAR-10 from /share.

The reference ran with Python 2-era NumPy, SciPy, scikit-image and ImageMagick; these
compatibility substitutions are applied to the source text before it is executed (the same
list is stored in the fixture's ``meta``):

* ``multichannel=True`` -> ``channel_axis=-1`` (scikit-image >= 0.19 removed ``multichannel``).
* ``np.float_`` -> ``np.float64`` (NumPy 2 removed the alias).
* ``from scipy.ndimage.interpolation import map_coordinates`` -> ``from scipy.ndimage import
  map_coordinates`` (deprecated namespace).
* ``np.fromstring(`` -> ``np.frombuffer(`` (NumPy 2 removed binary ``fromstring``).
* ``sk.util.random_noise(..., mode='s&p', amount=c)`` gets ``rng=np.random.randint(2**31)``:
  scikit-image >= 0.19 draws from a fresh ``default_rng()`` instead of NumPy's global RNG, so
  without this impulse_noise would ignore the seed and the fixture would not be reproducible.
  (Its salt-and-pepper sampler is also a per-element Bernoulli draw now, not the old version's.)
* ``pkg_resources.resource_filename(__name__, 'frost/frostN...')`` (imagenet) and
  ``'./frostN...'`` (cifar) -> the extracted frost image's path; the ``pkg_resources`` import
  is dropped.
* Wand (ImageMagick) is not available: its imports, the ``wandlibrary...argtypes`` statement and
  the ``MotionImage(WandImage)`` class are dropped and a stand-in ``MotionImage`` is injected
  (see ``make_motion_image``). It decodes the PNG blob with PIL, applies ``_motion_blur`` from
  the imagecorruptions package (a NumPy reimplementation of ImageMagick's motion blur, edge
  pixels replicated), rounds to nearest, clips to uint8 (ImageMagick writes 8-bit PNGs) and
  re-encodes as PNG in the same mode (RGB or L), so the reference's ``cv2.imdecode`` and BGR->RGB
  swap run unchanged. motion_blur and snow are therefore checked against that reimplementation,
  not against ImageMagick. imagecorruptions' own ``from pkg_resources import resource_filename``
  is satisfied by a stub module while it loads, if pkg_resources is missing.

Each corruption is called as make_cifar_c.py calls it,
``np.uint8(fn(PIL.Image.fromarray(img), severity))`` (truncation, not rounding), after
``np.random.seed(SEED_SCHEME)``. Inputs: CIFAR-10 samples (first file of each of the first 8
classes; first 8 files of each of the 10 classes for the statistics) and the PACS samples
centre-cropped from 227 to 224 (the first 2; every 10th of the sorted list for the statistics).
Stored: full outputs of the deterministic corruptions (imagenet: the top-left patch), and for
every corruption the mean absolute change per image and severity on the statistics inputs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT / "calibrun" / "samples" / "cifar10" / "test"
PACS_DIR = ROOT / "calibrun" / "samples" / "pacs" / "kfold"

DETERMINISTIC = ["gaussian_blur", "defocus_blur", "zoom_blur", "contrast", "brightness", "saturate",
                 "jpeg_compression", "pixelate"]
RANDOM = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
          "fog", "frost", "snow", "spatter", "elastic_transform"]
CORRUPTIONS = DETERMINISTIC + RANDOM
SEVERITIES = range(1, 6)
SEED_SCHEME = "np.random.seed(100000 * corruption_index + 1000 * severity + image_index)"

REFERENCE_FILES = {
    "cifar": "ImageNet-C/create_c/make_cifar_c.py",
    "imagenet": "ImageNet-C/imagenet_c/imagenet_c/corruptions.py",
}
FROST_NAMES = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"]
FROST_DIRS = {"cifar": "ImageNet-C/create_c", "imagenet": "ImageNet-C/imagenet_c/imagenet_c/frost"}

IMAGENET_SIZE, PACS_SIZE = 224, 227
CROP = (PACS_SIZE - IMAGENET_SIZE) // 2
# Side of the top-left patch of each imagenet output kept in the fixture (it includes the border,
# where edge handling shows). 64 was the plan, but the fixture came to 2.07 MB; 48 keeps it smaller.
PATCH = 48

# (old, new, why): applied to both recipes' source text before exec; frost paths are added per recipe.
TEXT_SUBSTITUTIONS = [
    ("multichannel=True", "channel_axis=-1", "scikit-image >= 0.19 removed multichannel"),
    ("np.float_", "np.float64", "NumPy 2 removed np.float_"),
    ("from scipy.ndimage.interpolation import map_coordinates", "from scipy.ndimage import map_coordinates",
     "scipy.ndimage.interpolation is deprecated"),
    ("np.fromstring(", "np.frombuffer(", "NumPy 2 removed binary np.fromstring"),
    ("mode='s&p', amount=c)", "mode='s&p', amount=c, rng=np.random.randint(2**31))",
     "scikit-image >= 0.19 random_noise ignores NumPy's global RNG; seed it from there"),
]
# Top-level imports of modules that are not available (or not needed once the paths are substituted).
DROPPED_MODULES = ("wand", "pkg_resources")


def git(repo: Path, *args: str) -> bytes:
    """Run git on the (bare) reference repository and return its stdout."""
    return subprocess.run(["git", "--git-dir", str(repo), *args], check=True, capture_output=True).stdout


def extract_reference(repo: Path, dest: Path) -> dict[str, Path]:
    """Write the two recipes and their frost images from HEAD to ``dest``; return the recipe paths."""
    paths = {}
    for recipe, path in REFERENCE_FILES.items():
        folder = dest / recipe
        folder.mkdir(parents=True)
        paths[recipe] = folder / Path(path).name
        paths[recipe].write_bytes(git(repo, "show", f"HEAD:{path}"))
        for name in FROST_NAMES:
            (folder / name).write_bytes(git(repo, "show", f"HEAD:{FROST_DIRS[recipe]}/{name}"))
    return paths


def frost_substitutions(recipe: str, folder: Path) -> list[tuple[str, str, str]]:
    """Replace the recipe's frost file references by the extracted files' absolute paths."""
    subs = []
    for name in FROST_NAMES:
        target = repr(str(folder / name))
        if recipe == "imagenet":
            subs.append((f"resource_filename(__name__, 'frost/{name}')", target, "pkg_resources not needed"))
        else:
            subs.append((f"'./{name}'", target, "frost images are read from the extracted copy"))
    return subs


def substitute(source: str, subs: list[tuple[str, str, str]]) -> tuple[str, dict[str, int]]:
    """Apply ``subs`` in order; return the new source and how often each matched (for the metadata)."""
    counts: dict[str, int] = {}
    for old, new, _ in subs:
        counts[old] = source.count(old)
        source = source.replace(old, new)
    return source, counts


def keep_statement(node: ast.stmt) -> bool:
    """Whether a top-level statement belongs to the helper/corruption definitions we want."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        return not any(n.split(".")[0] in DROPPED_MODULES for n in names)
    if isinstance(node, ast.ClassDef):
        return node.name != "MotionImage"  # the Wand subclass; a stand-in is injected instead
    if isinstance(node, ast.FunctionDef):
        return True
    # Keep warnings.simplefilter(...) (it is part of the reference's setup); drop every other
    # expression/assignment: the wandlibrary argtypes line and make_cifar_c.py's script part.
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "warnings.simplefilter")


def load_recipe(path: Path, recipe: str, motion_image: type) -> tuple[types.ModuleType, dict[str, int]]:
    """Execute the filtered, substituted recipe as a module with the stand-in MotionImage."""
    subs = TEXT_SUBSTITUTIONS + frost_substitutions(recipe, path.parent)
    source, counts = substitute(path.read_text(), subs)
    tree = ast.parse(source, filename=str(path))
    tree.body = [node for node in tree.body if keep_statement(node)]
    module = types.ModuleType(f"reference_{recipe}")
    module.__file__ = str(path)
    module.MotionImage = motion_image  # type: ignore[attr-defined]
    exec(compile(tree, str(path), "exec"), module.__dict__)
    missing = [name for name in CORRUPTIONS if not callable(getattr(module, name, None))]
    if missing:
        raise RuntimeError(f"{recipe}: reference lacks {missing}")
    return module, counts


def load_motion_blur(path: Path) -> Callable[..., np.ndarray]:
    """``_motion_blur`` from imagecorruptions' corruptions.py, loaded by path."""
    stubbed = False
    if importlib.util.find_spec("pkg_resources") is None:
        # The file imports resource_filename at module level (for its frost images, unused here).
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda package, name: str(path.parent / name)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"], stubbed = stub, True
    try:
        spec = importlib.util.spec_from_file_location("imagecorruptions_reference", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if stubbed:
            del sys.modules["pkg_resources"]
    return module._motion_blur


def imagecorruptions_version(path: Path) -> str:
    """The version in the package's dist-info next to it, if there is one."""
    for metadata in sorted(path.parent.parent.glob("imagecorruptions-*.dist-info/METADATA")):
        for line in metadata.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def make_motion_image(motion_blur: Callable[..., np.ndarray]) -> type:
    """A stand-in for the reference's Wand ``MotionImage``: same constructor, method and blob."""

    class MotionImage:
        def __init__(self, blob: bytes) -> None:
            self.image: Image.Image = Image.open(io.BytesIO(blob))
            self.image.load()

        def motion_blur(self, radius: float = 0.0, sigma: float = 0.0, angle: float = 0.0) -> None:
            array = np.asarray(self.image, dtype=np.float64)
            blurred = motion_blur(array, radius=radius, sigma=sigma, angle=angle)
            # ImageMagick quantizes to the 8-bit PNG it writes: round to nearest, then clip.
            pixels = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
            self.image = Image.fromarray(pixels, mode=self.image.mode)

        def make_blob(self) -> bytes:
            output = io.BytesIO()
            self.image.save(output, format="PNG")
            return output.getvalue()

    return MotionImage


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def cifar_inputs() -> tuple[np.ndarray, np.ndarray]:
    """First file of each of the first 8 classes; first 8 files of each of the 10 classes."""
    classes = sorted(p for p in CIFAR_DIR.iterdir() if p.is_dir())
    files = [sorted(c.glob("*.jpg")) for c in classes]
    inputs = np.stack([read_rgb(f[0]) for f in files[:8]])
    random_inputs = np.stack([read_rgb(p) for f in files for p in f[:8]])
    return inputs, random_inputs


def imagenet_inputs() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """PACS samples (sketch is stored as PNG), centre-cropped 227 -> 224: the first 2, every 10th."""
    files = sorted(p for p in PACS_DIR.glob("*/*/*") if p.suffix in (".jpg", ".png"))
    crop = slice(CROP, CROP + IMAGENET_SIZE)
    images = [read_rgb(p)[crop, crop] for p in files]
    names = [str(p.relative_to(PACS_DIR)) for p in files]
    return np.stack(images[:2]), np.stack(images[::10]), names[:2] + names[::10]


def corrupt(fn: Callable[..., Any], image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """One reference call, exactly as make_cifar_c.py makes it (np.uint8 truncates)."""
    np.random.seed(seed)
    out = np.uint8(fn(Image.fromarray(image), severity))
    if out.shape != image.shape:
        raise RuntimeError(f"{fn.__name__} severity {severity}: shape {out.shape} != {image.shape}")
    return out


def seed_of(corruption: str, severity: int, index: int) -> int:
    return 100000 * CORRUPTIONS.index(corruption) + 1000 * severity + index


def run_recipe(module: types.ModuleType, recipe: str, inputs: np.ndarray, random_inputs: np.ndarray,
               patch: int | None) -> dict[str, np.ndarray]:
    """Outputs on ``inputs`` for the deterministic corruptions, change statistics for all."""
    arrays: dict[str, np.ndarray] = {}
    for name in CORRUPTIONS:
        start = time.perf_counter()
        fn = getattr(module, name)
        if name in DETERMINISTIC:
            out = np.stack([np.stack([corrupt(fn, img, s, seed_of(name, s, i)) for i, img in enumerate(inputs)])
                            for s in SEVERITIES])
            arrays[f"{recipe}/{name}"] = out if patch is None else np.ascontiguousarray(out[:, :, :patch, :patch])
        change = np.empty((len(SEVERITIES), len(random_inputs)))
        for s in SEVERITIES:
            for i, img in enumerate(random_inputs):
                out = corrupt(fn, img, s, seed_of(name, s, i))
                change[s - 1, i] = np.abs(out.astype(np.float64) - img.astype(np.float64)).mean()
        arrays[f"{recipe}/{name}/change"] = change
        print(f"{recipe:9s} {name:18s} {time.perf_counter() - start:7.1f} s", flush=True)
    return arrays


def versions() -> dict[str, str]:
    """The library versions the reference ran under (they matter: see the substitutions)."""
    import cv2
    import scipy
    return {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__,
            "scikit-image": importlib.metadata.version("scikit-image"),
            "opencv": str(getattr(cv2, "__version__", "unknown")), "Pillow": importlib.metadata.version("pillow")}


def metadata(args: argparse.Namespace, commit: str, counts: dict[str, dict[str, int]],
             pacs_files: list[str], patch: int) -> str:
    """The fixture's provenance as JSON."""
    subs = [{"old": old, "new": new, "why": why} for old, new, why in TEXT_SUBSTITUTIONS]
    subs += [
        {"old": "resource_filename(__name__, 'frost/frostN') (imagenet), './frostN' (cifar)",
         "new": "path of the frost image extracted from the same commit", "why": "no package install"},
        {"old": "wand imports, wandlibrary.MagickMotionBlurImage.argtypes, class MotionImage(WandImage)",
         "new": "stand-in MotionImage: PIL decode, imagecorruptions _motion_blur, rint, clip uint8, PNG",
         "why": "ImageMagick/Wand not available"},
        {"old": "from pkg_resources import resource_filename", "new": "(dropped)", "why": "not installed"},
    ]
    return json.dumps({
        "robustness_commit": commit, "reference_files": REFERENCE_FILES,
        "imagecorruptions_version": imagecorruptions_version(args.imagecorruptions),
        "versions": versions(), "seed_scheme": SEED_SCHEME, "corruption_index_order": CORRUPTIONS,
        "call": "np.uint8(fn(PIL.Image.fromarray(img_uint8_rgb), severity))",
        "substitutions": subs, "substitution_counts": counts,
        "crop": f"PACS {PACS_SIZE}x{PACS_SIZE} -> [{CROP}:{CROP + IMAGENET_SIZE}, {CROP}:{CROP + IMAGENET_SIZE}]",
        "imagenet_patch": f"[:{patch}, :{patch}] of the {IMAGENET_SIZE}x{IMAGENET_SIZE} output",
        "imagenet_files": {"inputs": pacs_files[:2], "random_inputs": pacs_files[2:]},
        "change": "mean over pixels and channels of |out - input| (uint8 values), shape (severity, image)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=1)


def print_table(arrays: dict[str, np.ndarray]) -> None:
    print(f"\n{'recipe':9s} {'corruption':18s} " + " ".join(f"{'s' + str(s):>7s}" for s in SEVERITIES))
    for recipe in ("cifar", "imagenet"):
        for name in CORRUPTIONS:
            means = arrays[f"{recipe}/{name}/change"].mean(axis=1)
            print(f"{recipe:9s} {name:18s} " + " ".join(f"{m:7.2f}" for m in means))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robustness", type=Path, required=True, help="git dir of hendrycks/robustness")
    parser.add_argument("--imagecorruptions", type=Path, required=True, help="imagecorruptions/corruptions.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patch", type=int, default=PATCH, help="side of the imagenet top-left patch kept")
    args = parser.parse_args()
    start = time.perf_counter()
    commit = git(args.robustness, "rev-parse", "HEAD").decode().strip()
    motion_image = make_motion_image(load_motion_blur(args.imagecorruptions))
    cifar, cifar_random = cifar_inputs()
    imagenet, imagenet_random, pacs_files = imagenet_inputs()
    arrays = {"cifar/inputs": cifar, "cifar/random_inputs": cifar_random,
              "imagenet/inputs": imagenet, "imagenet/random_inputs": imagenet_random}
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = extract_reference(args.robustness, Path(tmp))
        for recipe, inputs, random_inputs, patch in (("cifar", cifar, cifar_random, None),
                                                     ("imagenet", imagenet, imagenet_random, args.patch)):
            module, counts[recipe] = load_recipe(paths[recipe], recipe, motion_image)
            arrays.update(run_recipe(module, recipe, inputs, random_inputs, patch))
    arrays["meta"] = np.array(metadata(args, commit, counts, pacs_files, args.patch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)  # type: ignore[arg-type]
    print_table(arrays)
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
