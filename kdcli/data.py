"""MNIST and Fashion-MNIST as tensors on the training device.

    data = load_dataset(cfg, device)            # whole dataset, already on `device`
    x = jitter(data.train_x[idx], max_shift=2)  # vectorised per-sample shifts

The four IDX files are looked for in `--data-dir`, else `$KDCLI_DATA_DIR`,
else the per-user cache (`~/.cache/kdcli`), each as a folder holding the files
directly, a `<dataset>/` sub-folder, or torchvision's `MNIST/raw/` layout.
When they are absent, torchvision's downloader fetches them into the cache.

No per-sample Python and no DataLoader: batches are index tensors into the
images held on the device, so the loop is bound by the matmuls.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")], "mnist": []}
IDX_DTYPE = {0x08: torch.uint8}
IMAGE_SIDE = 28
log = logging.getLogger(__name__)


from .errors import DataError


@dataclass
class Dataset:
    """Images as float32 in [0, 1], shape (n, 28, 28); labels as int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    name: str


# --- IDX files -------------------------------------------------------------

def read_idx(path: Path) -> torch.Tensor:
    """Parse an IDX file, gzip-compressed or plain, into a uint8 tensor."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPE or not 1 <= raw[3] <= 3:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number {raw[:4].hex() or 'empty'})")
    n_dims = raw[3]
    header = 4 + 4 * n_dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{n_dims}I", raw[4:header])
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise DataError(f"{path}: truncated or padded IDX data: {len(raw)} bytes, header promises {expected}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def candidate_dirs(dataset: str, data_dir: str | None) -> list[Path]:
    roots = [Path(data_dir)] if data_dir else []
    if not data_dir and os.environ.get("KDCLI_DATA_DIR"):
        roots.append(Path(os.environ["KDCLI_DATA_DIR"]))
    if not data_dir:
        roots.append(cache_dir())
    dirs = []
    for root in roots:
        dirs += [root, root / dataset, root / TORCHVISION_FOLDER[dataset] / "raw"]
    return dirs + SYSTEM_DIRS[dataset]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdcli"


def find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(dataset: str, data_dir: str | None, download: bool = True) -> dict[str, Path]:
    """Paths of the four IDX files; downloads into the cache when allowed."""
    dirs = candidate_dirs(dataset, data_dir)
    for folder in dirs:
        found = {key: find_file(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found
    if download and not data_dir:
        try:
            fetch(dataset, cache_dir())
            return locate(dataset, data_dir, download=False)
        except Exception:  # offline, or the mirror is down: fall through to the clear error
            pass
    where = data_dir or os.environ.get("KDCLI_DATA_DIR") or str(cache_dir())
    raise DataError(
        f"{dataset} not found: put {', '.join(s + '[.gz]' for s in FILES.values())} in {where} "
        f"(or {where}/{dataset}), or pass --data-dir / set KDCLI_DATA_DIR"
    )


def fetch(dataset: str, root: Path) -> None:
    """Download with torchvision (it checks the MD5 sums) into root/<Folder>/raw."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[dataset]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def read_split(paths: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(paths[f"{split}_x"])
    labels = read_idx(paths[f"{split}_y"])
    if images.dim() != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{paths[f'{split}_x']}: expected 28x28 images, got shape {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{paths[f'{split}_y']}: {len(labels)} labels for {len(images)} images in {paths[f'{split}_x'].name}")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{paths[f'{split}_y']}: label {int(labels.max())} outside 0-9")
    return images, labels.long()


# --- the dataset on the device ----------------------------------------------

def load_dataset(cfg: Config, device: torch.device) -> Dataset:
    """Train / validation / test tensors on `device`, as the config asks."""
    paths = locate(cfg.dataset, cfg.data_dir)
    log.info("%s from %s", cfg.dataset, paths["train_x"].parent)
    train_x, train_y = read_split(paths, "train")
    if cfg.test_eval:
        test_x, test_y = read_split(paths, "test")
    else:  # a blind run never opens the test files
        test_x, test_y = train_x[:0], train_y[:0]
    if cfg.val_size >= len(train_x):
        raise DataError(f"val_size {cfg.val_size} leaves no training data ({len(train_x)} images)")
    # The validation split is the *last* val_size training images, taken
    # before any subsetting, so it is the same for every run that asks for it.
    n_train = len(train_x) - cfg.val_size
    val_x, val_y = train_x[n_train:], train_y[n_train:]
    train_x, train_y = train_x[:n_train], train_y[:n_train]
    if cfg.train_limit:
        train_x, train_y = train_x[: cfg.train_limit], train_y[: cfg.train_limit]
    if cfg.test_limit:
        test_x, test_y = test_x[: cfg.test_limit], test_y[: cfg.test_limit]
    if cfg.train_subset:
        keep = stratified_subset(train_y, cfg.train_subset, cfg.subset_seed)
        train_x, train_y = train_x[keep], train_y[keep]

    def to_device(images, labels):
        return (images.to(device=device, dtype=torch.float32) / 255.0), labels.to(device)

    return Dataset(*to_device(train_x, train_y), *to_device(val_x, val_y), *to_device(test_x, test_y), name=cfg.dataset)


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n examples, as equal a share of each class as possible."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, count in zip(classes, per_class):
        members = (labels == c).nonzero().squeeze(1)
        if count > len(members):
            raise DataError(f"train_subset {n} asks for {count} examples of class {int(c)}, only {len(members)} exist")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def class_filter(labels: torch.Tensor, omit: list[int], keep: list[int]) -> torch.Tensor:
    """Indices of the transfer set: every example except omitted digits, or only kept ones."""
    mask = torch.ones_like(labels, dtype=torch.bool)
    if omit:
        mask &= ~torch.isin(labels, torch.tensor(omit, device=labels.device))
    if keep:
        mask &= torch.isin(labels, torch.tensor(keep, device=labels.device))
    return mask.nonzero().squeeze(1)


# --- augmentation -----------------------------------------------------------

def jitter(images: torch.Tensor, max_shift: int,
           generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift],
    filling with zeros. images: (..., 28, 28); one gather for the whole batch.
    A list of generators, one per member (images' first dimension), draws member k's
    shifts from generators[k], as a single run seeded like member k draws them."""
    return jitter_windows(images, max_shift, generator)[0]


def jitter_windows(images: torch.Tensor, max_shift: int,
                   generator: torch.Generator | list[torch.Generator] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """jitter(), and which shift each image got: (shifted images, windows (2, ...)),
    windows[:, i] the (row, column) of image i's window in [0, 2 * max_shift], as
    every_shift() numbers them (None without jitter)."""
    if max_shift == 0:
        return images, None
    lead, (h, w) = images.shape[:-2], images.shape[-2:]
    flat = images.reshape(-1, h, w)
    n = flat.shape[0]
    generators = generator if isinstance(generator, list) else [generator]
    shifts = torch.cat([torch.randint(-max_shift, max_shift + 1, (2, n // len(generators)), generator=g)
                        for g in generators], dim=1).to(images.device)
    windows = max_shift - shifts
    shifted = shifted_windows(flat, max_shift)[torch.arange(n, device=images.device), windows[0], windows[1]]
    return shifted.reshape(*lead, h, w), windows.reshape(2, *lead)


def shifted_windows(flat: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Every shifted window of images (n, h, w) as a strided view (n, 2s+1, 2s+1, h, w);
    indexing copies only the chosen one (about 5x cheaper than gathering pixel by pixel)."""
    h, w = flat.shape[-2:]
    padded = torch.nn.functional.pad(flat, (max_shift,) * 4)  # (n, h+2s, w+2s)
    return padded.unfold(1, h, 1).unfold(2, w, 1)


def every_shift(images: torch.Tensor, max_shift: int):
    """(row, column, images shifted so) for each of jitter()'s (2s+1)^2 windows, zero-filled."""
    windows = shifted_windows(images, max_shift)
    for row in range(2 * max_shift + 1):
        for column in range(2 * max_shift + 1):
            yield row, column, windows[:, row, column]
