"""Losses: LPIPS with a local weights file, hinge / generator GAN losses, adaptive weight, TokenizerLoss."""
import warnings

import pytest
import torch

from pipeline.config.schema import build_section
from pipeline.losses import (
    LPIPSLoss,
    PatchGANDiscriminator,
    TokenizerLoss,
    adaptive_gan_weight,
    budget_loss,
    generator_gan_loss,
    hinge_d_loss,
    reconstruction_loss,
)
from pipeline.models.registry import build_tokenizer
from pipeline.models.tokenizer_config import TokenizerConfig
from pipeline.models.tokenizers import TokenizerAux


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A randomly initialised torchvision VGG16 `features` state_dict (no download possible here)."""
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        features = torchvision.models.vgg16(weights=None).features
    path = tmp_path_factory.mktemp("lpips") / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return str(path)


def test_lpips_zero_for_identical_positive_otherwise(vgg_weights):
    loss = LPIPSLoss(vgg_weights)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, y)) > 0
    assert not any(p.requires_grad for p in loss.parameters())
    y.requires_grad_(True)
    loss(x, y).backward()  # gradient flows to the reconstruction
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_missing_or_bad_weights_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.lpips_weights"):
        LPIPSLoss(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="tokenizer.lpips_weights"):
        LPIPSLoss("")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="tokenizer.lpips_weights"):
        LPIPSLoss(str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(RuntimeError, match="tokenizer.lpips_weights"):
        LPIPSLoss(str(wrong))


def test_hinge_and_generator_losses():
    real = torch.tensor([2.0, 0.0])
    fake = torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.5 + 0.75)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.625)
    assert float(generator_gan_loss(fake)) == pytest.approx(0.75)


def test_adaptive_weight_ratio_and_clamp():
    w = torch.nn.Parameter(torch.ones(3))
    nll, g = 6.0 * w.sum(), 2.0 * w.sum()
    expected = (6 * 3 ** 0.5) / (2 * 3 ** 0.5 + 1e-4)
    assert float(adaptive_gan_weight(nll, g, w, 1e4)) == pytest.approx(expected, rel=1e-6)
    assert float(adaptive_gan_weight(1e6 * w.sum(), 1e-3 * w.sum(), w, 100.0)) == 100.0
    assert float(adaptive_gan_weight(0.0 * w.sum(), w.sum(), w, 100.0)) == 0.0


def test_reconstruction_and_budget_losses():
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 2.0)
    assert float(reconstruction_loss(a, b, "l1")) == 2.0 and float(reconstruction_loss(a, b, "l2")) == 4.0
    assert float(budget_loss(torch.tensor(0.8), 0.5, 10.0)) == pytest.approx(0.9)


def test_patchgan_shape():
    d = PatchGANDiscriminator(3, 16, 3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_tokenizer_loss_generator_and_discriminator_steps(vgg_weights):
    cfg = build_section(TokenizerConfig, {"preset": "rq-demo", "ch": 8, "z_channels": 8, "codebook_size": 16,
                                          "gan_weight": 0.75, "lpips_weight": 1.0, "lpips_weights": vgg_weights,
                                          "disc_start_step": 5, "disc_ndf": 8}, "tokenizer")
    torch.manual_seed(0)
    model, crit = build_tokenizer(cfg, 32), TokenizerLoss(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, aux = model(x)
    total, logs = crit.generator_loss(x, recon, aux, step=0, last_layer=model.get_last_layer())
    assert "g_loss" not in logs and {"recon_loss", "lpips", "quant_loss", "total_loss"} <= set(logs)
    d_loss, d_logs = crit.discriminator_loss(x, recon.detach(), step=0)
    assert float(d_loss) == 0.0 and not d_loss.requires_grad and not crit.gan_active(0)
    total, logs = crit.generator_loss(x, recon, aux, step=5, last_layer=model.get_last_layer())
    assert logs["adaptive_weight"] >= 0 and "g_loss" in logs
    total.backward()
    assert model.get_last_layer().grad is not None
    d_loss, d_logs = crit.discriminator_loss(x, recon.detach(), step=5)
    d_loss.backward()
    assert d_loss.item() > 0 and all(p.grad is not None for p in crit.discriminator.parameters())
    with torch.no_grad():  # validation: no adaptive weight possible, GAN term logged with lambda 0
        _, logs = crit.generator_loss(x, recon, aux, step=5, last_layer=model.get_last_layer())
    assert logs["adaptive_weight"] == 0.0


@pytest.mark.parametrize("preset,router,expect_budget", [("dq-demo", "learned", True), ("dq-demo", "entropy", False),
                                                         ("rq-demo", "learned", False)])
def test_tokenizer_loss_adds_the_budget_for_the_learned_router_only(preset, router, expect_budget):
    cfg = build_section(TokenizerConfig, {"preset": preset, "router": router, "lpips_weight": 0.0, "gan_weight": 0.0,
                                          "target_ratio": 0.25, "budget_weight": 10.0}, "tokenizer")
    crit = TokenizerLoss(cfg)
    x = torch.zeros(1, 3, 4, 4)
    fine_ratio = torch.tensor(0.75, requires_grad=True)
    aux = TokenizerAux(quant_loss=torch.tensor(0.5), usage_D=torch.zeros(1), perplexity_D=torch.ones(1),
                       fine_ratio=fine_ratio)
    total, logs = crit.generator_loss(x, x + 1.0, aux, step=0, last_layer=None)
    expected = 1.0 + 0.5 + (10.0 * 0.5 ** 2 if expect_budget else 0.0)
    assert float(total.detach()) == pytest.approx(expected) and ("budget_loss" in logs) == expect_budget
    if expect_budget:
        total.backward()
        assert float(fine_ratio.grad) == pytest.approx(2 * 10.0 * 0.5)  # d/dr gamma (r - t)^2
