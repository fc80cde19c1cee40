import functools
import os
import random
from pathlib import Path

import pytest
import torch

# without a GPU the Triton kernels (tvq.ops.kernels) run on CPU tensors through Triton's interpreter, which must
# be chosen before triton is imported (importing torch or tvq does not import it)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tvq import TransformerVQ, TransformerVQConfig

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


# Text for the tests that train or load a corpus: play-like English generated here, so that the
# tests need nothing beside the repository. Speakers, then lines of Zipf-distributed common words.
_SPEAKERS = ("ROMEO", "JULIET", "KING RICHARD", "QUEEN", "First Citizen", "Second Citizen", "MENENIUS",
             "DUKE", "NURSE", "FRIAR", "GLOUCESTER", "LADY ANNE", "HAMLET", "BRUTUS", "CORIOLANUS")
_WORDS = """the and to of I you my a that in is not with me it for be his your this but he have as thou so
him will what by all do no shall if are we thee on our lord now good from at they her sir more then well
would come let which how there here love or she make know than say man them their may upon am yet one
like go king should see must an too did such some why can these were when hath speak us who most had
much day life time heart death tell never doth give mine hear night father first nor both fair sweet great
true old out up away god blood name world hand till eyes poor honour noble done where house way mind call
those fear thus again word peace brother grace hope power gentle friend son mother heaven earth stay think
leave being bear live still better though whose take ever since any nothing lady dead head place back
stand against youth soul fortune crown sword horse winter summer light window breaks proceed further
queen duke citizen people city gates war battle honest virtue shame woe joy tears grief sorrow bloody
heavy merry young little long proud quick answer bring keep send show swear weep fight kill die sleep
dream wake rise fall""".split()


_TEXT_BYTES = 200_000


@functools.cache
def _play() -> bytes:
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) for rank in range(len(_WORDS))]
    parts, size = [], 0
    while size < _TEXT_BYTES:
        block = [rng.choice(_SPEAKERS) + ":"]
        for _ in range(1 + int(rng.random() * 4)):
            words = rng.choices(_WORDS, weights, k=3 + int(rng.random() * 9))
            line = " ".join(words)
            block.append(line[0].upper() + line[1:] + rng.choice(",,,.;:!?"))
        block[-1] = block[-1][:-1] + rng.choice("..!?")
        text = "\n".join(block) + "\n\n"
        parts.append(text)
        size += len(text)
    return "".join(parts).encode("ascii")


def sample_text(n_bytes: int = _TEXT_BYTES) -> bytes:
    """The first n_bytes (at most 200,000) of a fixed play-like English ASCII text (speaker lines such as
    "ROMEO:", sentences of common words): made here, the same on every run and every machine."""
    if not 0 < n_bytes <= _TEXT_BYTES:
        raise ValueError(f"sample_text gives 1 to {_TEXT_BYTES:,} bytes, not {n_bytes}")
    return _play()[:n_bytes]


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
        for gau in model.attns:
            if gau.quantizer is not None:
                gau.quantizer.c_sum.normal_(0.0, gau.config.d_k**-0.25)
    return model


def clone_with(model: TransformerVQ, **overrides) -> TransformerVQ:
    """Same weights and buffers, config changed."""
    other = TransformerVQ(model.config.replace(**overrides)).to(model.embed.weight.dtype)
    other.load_state_dict(model.state_dict())
    other.train(model.training)
    return other


def decoded(model: TransformerVQ, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """The logits (B, T - prefix, V) of stepping ``model.decoder`` through ids[:, prefix:] after a forward over
    the first ``prefix`` tokens: what a test compares with the forward's logits over the same positions."""
    with torch.no_grad():
        decoder = model.decoder(model(ids[:, :prefix]).state)
        return torch.stack([decoder.step(ids[:, t]) for t in range(prefix, ids.shape[1])], 1)


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


def close_to_reference(got, want, rtol):
    """Within rtol of the reference's largest magnitude (float32 rounding of sums over many terms): how the
    Triton kernels' tests compare with the float64 PyTorch path."""
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * max(scale, 1e-12))


def grads_close(got: dict, want: dict, rtol):
    """Every gradient of ``want`` (name -> tensor or None) matched by ``got``'s, None where it is None."""
    for name, w in want.items():
        g = got[name]
        if w is None or g is None:
            assert w is None and g is None, name
        else:
            close_to_reference(g, w, rtol)
