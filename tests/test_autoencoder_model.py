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


def dead_code_moves(threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each code of a tiny VQ autoencoder moves in one training pass over a constant image, and which codes
    that pass left unused (dead)."""
    torch.manual_seed(0)
    model = tiny("vq", vq_kmeans_init=False, vq_dead_code_threshold=threshold, codebook_size=64)
    codebook = model.quantizer.impl._codebook
    model.train()
    # a constant image: every position maps to a handful of codes, the rest are dead
    x = torch.zeros(8, 3, 32, 32)
    before = codebook.embed.clone()
    with torch.no_grad():
        tokens = model.quantizer(model.encoder(x)).indices
    dead = torch.ones(64, dtype=torch.bool)
    dead[torch.unique(tokens)] = False
    return (codebook.embed[0] - before[0]).norm(dim=-1), dead


def test_dead_codes_are_replaced():
    moved, dead = dead_code_moves(threshold=1.0)
    assert 0 < dead.sum() < 64
    # replaced by batch vectors: a real move, not the renormalisation every training pass applies to every code
    assert moved[dead].min() > 1e-2, "every dead code should be replaced by a vector from the batch"
    kept, dead = dead_code_moves(threshold=0.0)  # the control: no replacement
    assert kept[dead].max() < 1e-5


def test_unknown_setting_names_the_field():
    with pytest.raises(ValueError, match="codebook_sise"):
        Autoencoder.from_size("tiny", codebook_sise=10)
    with pytest.raises(ValueError, match="model.net.size"):
        Autoencoder.from_size("huge")


@pytest.mark.parametrize("context", [0, 1])
def test_patch_encoder_tokens_see_only_their_neighbourhood(context):
    """encoder=patch: a token depends on the pixels of its own patch and of those `patch_context` cells away,
    nothing else; a flat background is one token, at the border as inside."""
    torch.manual_seed(0)
    model = tiny("fsq", encoder="patch", patch_context=context).eval()
    assert model.downsample_factor == 4  # an 8x8 grid of cells
    x = torch.full((1, 3, 32, 32), -1.0)
    x[..., 12:16, 12:16] = torch.rand(3, 4, 4)  # fills cell (3, 3) exactly
    with torch.no_grad():
        latents = model.encoder(x)[0].permute(1, 2, 0)  # (8, 8, latent_dim)
    near = torch.zeros(8, 8, dtype=torch.bool)
    near[3 - context : 4 + context, 3 - context : 4 + context] = True
    assert torch.equal(latents[~near], latents[0, 0].expand_as(latents[~near]))
    assert not torch.equal(latents[3, 3], latents[0, 0])
    moved = x.clone()
    moved[..., 28:, 28:] = 1.0  # something in cell (7, 7): latents of cells more than `context` away stay put
    with torch.no_grad():
        for encoder, local in ((model.encoder, True), (tiny("fsq").encoder, False)):  # conv: a wide field
            keep = 7 - context
            same = torch.equal(encoder(moved)[..., :keep, :keep], encoder(x)[..., :keep, :keep])
            assert same == local


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="model.net.encoder"):
        tiny("fsq", encoder="vit")
    with pytest.raises(ValueError, match="model.net.patch_context"):
        tiny("fsq", encoder="patch", patch_context=-1)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_code_vectors_are_the_decoder_inputs_of_each_id(quantizer):
    torch.manual_seed(0)
    model = tiny(quantizer).eval()
    vectors = model.code_vectors()  # (V, D)
    assert vectors.shape[0] == model.vocab_size
    ids = torch.randint(model.vocab_size, (2, 3, 5))
    torch.testing.assert_close(vectors[ids].permute(0, 3, 1, 2), model.quantizer.codes_from_indices(ids))


def _vq_codebook_under_ddp(rank: int, world: int, init_file: str, out_dir: str, synchronise: bool) -> None:
    import torch.distributed as dist

    # the same model on every process, built before the process group exists (as in a run)
    torch.manual_seed(0)
    quantizer = Autoencoder.from_size("tiny", quantizer="vq", vq_dead_code_threshold=2.0).quantizer.train()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if synchronise:
        quantizer.synchronise_codebook()
    torch.manual_seed(1 + rank)  # each process its own batches and random draws
    for _ in range(3):
        quantizer(torch.randn(4, quantizer.impl.project_in.in_features, 4, 4) * (1 + rank))
    torch.save(quantizer.impl._codebook.embed, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("synchronise", [True, False])
def test_ddp_processes_keep_one_vq_codebook(tmp_path, synchronise):
    import torch.multiprocessing as mp

    mp.spawn(_vq_codebook_under_ddp, args=(2, str(tmp_path / "init"), str(tmp_path), synchronise), nprocs=2)
    codebooks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    # without it, each process's updates and dead-code replacements make a codebook of its own
    assert torch.equal(*codebooks) == synchronise
