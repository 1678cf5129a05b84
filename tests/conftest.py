import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): a worker per core, at most 4 (the DDP tests start 2 processes each)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run first (a stable sort: otherwise in file order), so that the parallel workers
    end on short tests instead of one of them finishing a long one alone. Tests marked ``gpu`` are skipped,
    with the reason, where no CUDA device is present."""
    import torch

    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar10_jpeg() -> Path:
    """The real CIFAR-10 as a JPEG image-folder tarball, beside the project (always there in CI)."""
    if not CIFAR10_JPEG.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CIFAR10_JPEG} is missing in CI, where it must be present")
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_JPEG} (expected beside the project in ../shared/data)")
    return CIFAR10_JPEG


@pytest.fixture(scope="session")
def cifar10_cache(tmp_path_factory) -> Path:
    """One decode cache of the real CIFAR-10 for the whole test session, shared by the parallel workers
    (their base folders have one parent; the cache's files are written atomically, so two workers that
    decode at once both end with a valid cache). Tests of decoding itself use their own folder."""
    return tmp_path_factory.getbasetemp().parent / "maxdrop-test-cache"


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """A CIFAR-10 image-folder tree with 4 train and 2 test PNGs per class (image ids in the first pixels)."""
    from tests.helpers.data import CIFAR10_CLASSES, tree_files, write_image_tree

    root = tmp_path_factory.mktemp("tiny") / "cifar10"
    return write_image_tree(root, tree_files(CIFAR10_CLASSES, {"train": 4, "test": 2}))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Configs may set num_threads (torch.set_num_threads) in-process: keep that from leaking into other tests."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
