"""IDX parsing, data location, jitter, subsets and class omission."""

import gzip
import hashlib

import pytest
import torch

from conftest import SHARED_DATA, write_idx
from kdcli.config import make_config
from kdcli.data import DataError, class_filter, jitter, load_dataset, locate, read_idx, stratified_subset

CHECKSUMS = {  # ../shared/data/README.md: sha256 of the decompressed files
    "mnist/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "mnist/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "mnist/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "mnist/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    path = write_idx(tmp_path / "x.idx", array, compress=compress)
    assert torch.equal(read_idx(path), array)


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = write_idx(tmp_path / "x", torch.zeros(4, 28, 28, dtype=torch.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_wrong_magic_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(100)))
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(50))
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_label_count_mismatch_names_the_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", torch.zeros(10, 28, 28, dtype=torch.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.zeros(9, dtype=torch.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(10, 28, 28, dtype=torch.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(DataError, match="train-labels.*9 labels for 10 images"):
        load_dataset(make_config({"data_dir": str(tmp_path)}), torch.device("cpu"))


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="real MNIST not present")
@pytest.mark.parametrize("name", sorted(CHECKSUMS))
def test_real_files_match_published_checksums(name):
    raw = gzip.decompress((SHARED_DATA / (name + ".gz")).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == CHECKSUMS[name]


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="real MNIST not present")
def test_real_mnist_loads_with_the_known_counts():
    data = load_dataset(make_config({"data_dir": str(SHARED_DATA), "val_size": 10000}), torch.device("cpu"))
    assert data.train_x.shape == (50000, 28, 28) and data.val_x.shape == (10000, 28, 28)
    assert torch.bincount(data.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0


def test_missing_files_name_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*--data-dir"):
        locate("mnist", str(tmp_path / "empty"))


def test_data_dir_precedence(tmp_path, monkeypatch, synthetic_dir):
    monkeypatch.setenv("KDCLI_DATA_DIR", str(synthetic_dir))
    assert locate("mnist", None)["train_x"].parent == synthetic_dir
    with pytest.raises(DataError):  # an explicit --data-dir wins over the environment
        locate("mnist", str(tmp_path))


def test_dataset_subfolder_layout(tmp_path, synthetic_dir):
    (tmp_path / "mnist").symlink_to(synthetic_dir)
    assert locate("mnist", str(tmp_path))["test_y"].parent == tmp_path / "mnist"


def test_jitter_shifts_within_range_and_per_sample():
    images = torch.zeros(200, 28, 28)
    images[:, 14, 14] = 1.0  # one lit pixel: its new place is the shift
    shifted = jitter(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    where = shifted.flatten(1).argmax(1)
    dy, dx = where // 28 - 14, where % 28 - 14
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert shifted.sum() == 200  # nothing lost, nothing duplicated
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # every shift in [-2, 2]^2 occurs
    assert jitter(images, 0) is images


def test_jitter_leaves_stacked_shapes():
    images = torch.rand(3, 7, 28, 28)
    assert jitter(images, 2).shape == (3, 7, 28, 28)


def test_stratified_subset_is_balanced_and_fixed():
    labels = torch.arange(1000) % 10
    a = stratified_subset(labels, 30, seed=0)
    assert torch.bincount(labels[a]).tolist() == [3] * 10
    assert torch.equal(a, stratified_subset(labels, 30, seed=0))
    assert not torch.equal(a, stratified_subset(labels, 30, seed=1))


def test_class_filter_omits_every_example_and_keeps_the_rest():
    labels = torch.randint(0, 10, (5000,))
    kept = class_filter(labels, omit=[3], keep=[])
    assert not (labels[kept] == 3).any()
    assert len(kept) == int((labels != 3).sum())
    only = class_filter(labels, omit=[], keep=[7, 8])
    assert set(labels[only].tolist()) == {7, 8}
    assert len(only) == int(((labels == 7) | (labels == 8)).sum())
