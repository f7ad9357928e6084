import os
import sys

import pytest

# Dassl imports wilds -> ogb, which warns when its background PyPI version check fails (offline).
os.environ.setdefault("OUTDATED_IGNORE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py imports the repository's ``trainers`` and ``datasets`` folders from the checkout (as in
# CoOp); put the checkout first so an installed HuggingFace ``datasets`` never shadows ours.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def dassl_available() -> bool:
    try:
        import dassl  # noqa: F401
    except Exception:
        return False
    return True


requires_dassl = pytest.mark.skipif(
    not dassl_available(),
    reason="upstream Dassl.pytorch is not installed (see README: Install > Dassl.pytorch); CI has no git access",
)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is much faster than two on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    from tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")


@pytest.fixture(scope="session")
def frozen_clip(tiny_clip_path):
    from spotlighter.backbone import FrozenCLIP, load_clip

    return FrozenCLIP(load_clip("ViT-B/16", path=tiny_clip_path))


@pytest.fixture
def env(tmp_path):
    """A throwaway repository with the protocol scripts and the stub interpreter (tests/script_repo.py)."""
    from script_repo import make_env

    return make_env(tmp_path)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node SLURM cluster on localhost (tests/slurm_cluster.py); skipped with the reason where it cannot start."""
    import slurm_cluster

    try:
        cluster = slurm_cluster.start(str(tmp_path_factory.mktemp("slurm")))
    except slurm_cluster.ClusterUnavailable as exc:
        pytest.skip(str(exc).splitlines()[0])
    yield cluster
    cluster.stop()


_DASSL_LOGGERS = []  # kept alive on purpose, see run_in_process


def run_in_process(argv, capsys):
    """train.main in this process (imports paid once); restores the stdout Dassl's logger replaces."""
    import logging

    import train

    saved, handlers = sys.stdout, logging.getLogger().handlers[:]
    try:
        code = train.main(argv)
    finally:
        if sys.stdout is not saved:  # Dassl's Logger: its __del__ would close pytest's stdout capture
            if getattr(sys.stdout, "file", None) is not None:
                sys.stdout.file.close()
                sys.stdout.file = None
            _DASSL_LOGGERS.append(sys.stdout)
        sys.stdout = saved
        logging.getLogger().handlers[:] = handlers
    return code, capsys.readouterr().err
