"""The quantizers as wired into the autoencoder."""

import pytest
import torch

from imagen.models.autoencoder import Autoencoder

QUANTIZERS = ["vq", "fsq", "lfq"]


def tiny(quantizer: str, **kw) -> Autoencoder:
    extra = {"fsq_levels": (4, 4, 4)} if quantizer == "fsq" else {}
    return Autoencoder.from_size("tiny", quantizer=quantizer, **extra, **kw)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_gradients_reach_the_encoder(quantizer):
    torch.manual_seed(0)
    model = tiny(quantizer)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    recon, q = model(x)
    (torch.nn.functional.mse_loss(recon, x) + q.aux_loss).backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_index_to_code_round_trip_is_exact(quantizer):
    torch.manual_seed(0)
    model = tiny(quantizer)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.train()
    model(x)  # vq: k-means initialises the codebook on the first training batch
    model.eval()
    with torch.no_grad():
        q = model.quantizer(model.encoder(x))
        codes = model.quantizer.codes_from_indices(q.indices)
        assert codes.shape == q.quantized.shape
        torch.testing.assert_close(codes, q.quantized, rtol=1e-5, atol=1e-5)
        # and decode() takes the same path as the forward pass
        torch.testing.assert_close(
            model.decode(q.indices), model.decoder(q.quantized).clamp(-1, 1), rtol=1e-5, atol=1e-5
        )
    assert q.indices.dtype == torch.long
    assert 0 <= q.indices.min() and q.indices.max() < model.vocab_size


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_decode_of_encode_has_the_input_shape(quantizer):
    model = tiny(quantizer).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (2, 32 // model.downsample_factor, 32 // model.downsample_factor)
    assert model.decode(tokens).shape == x.shape


def test_dead_codes_are_replaced():
    torch.manual_seed(0)
    model = tiny("vq", vq_kmeans_init=False, vq_dead_code_threshold=1.0, codebook_size=64)
    codebook = model.quantizer.impl._codebook
    model.train()
    # a constant image: every position maps to a handful of codes, the rest are dead
    x = torch.zeros(8, 3, 32, 32)
    before = codebook.embed.clone()
    with torch.no_grad():
        tokens = model.quantizer(model.encoder(x)).indices
    used = torch.unique(tokens)
    assert len(used) < 64
    dead = torch.ones(64, dtype=torch.bool)
    dead[used] = False
    changed = (codebook.embed[0] - before[0]).abs().sum(-1) > 0
    assert changed[dead].all(), "every dead code should be replaced by a vector from the batch"


def test_unknown_setting_names_the_field():
    with pytest.raises(ValueError, match="codebook_sise"):
        Autoencoder.from_size("tiny", codebook_sise=10)
    with pytest.raises(ValueError, match="model.net.size"):
        Autoencoder.from_size("huge")
