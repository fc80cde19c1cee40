import os
import subprocess
from pathlib import Path

import pytest
import torch

from tvq import TransformerVQ, TransformerVQConfig

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The real data directory: ``$TVQ_SHARED_DATA``, else ``shared/data`` beside the project, else
    beside the checkout this one was cloned from (a CI clone in a scratch directory)."""
    if os.environ.get("TVQ_SHARED_DATA"):
        return Path(os.environ["TVQ_SHARED_DATA"])
    here = ROOT.parent / "shared" / "data"
    if here.is_dir():
        return here
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()
    if origin and Path(origin).is_dir():
        return Path(origin).resolve().parent / "shared" / "data"
    return here


SHARED_DATA = _shared_data()
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def tiny_config(**overrides) -> TransformerVQConfig:
    """A model small enough to compare paths in float64 in milliseconds."""
    base = dict(vocab_size=50, d_model=16, d_k=4, d_v=8, n_head=2, n_layer=1, n_code=8,
                block_len=4, mem_len=8)
    base.update(overrides)
    return TransformerVQConfig(**base)


def make_model(seed: int = 0, dtype=torch.float64, **overrides) -> TransformerVQ:
    torch.manual_seed(seed)
    model = TransformerVQ(tiny_config(**overrides)).to(dtype)
    # spread the codebook so that keys use many codes and the cache holds several entries
    with torch.no_grad():
        for gau in model.gaus:
            if gau.quantizer is not None:
                gau.quantizer.c_sum.normal_(0.0, gau.config.d_k**-0.25)
    return model


def clone_with(model: TransformerVQ, **overrides) -> TransformerVQ:
    """Same weights and buffers, config changed."""
    other = TransformerVQ(model.config.replace(**overrides)).to(model.embed.weight.dtype)
    other.load_state_dict(model.state_dict())
    other.train(model.training)
    return other


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 50, (2, 200))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models
    gain nothing from threads, spawned ranks use one each, and on a loaded machine two can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
