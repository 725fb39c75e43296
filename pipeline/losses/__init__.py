"""Tokenizer training losses: reconstruction, LPIPS, PatchGAN + adaptive weight, DQ budget."""
from .budget import budget_loss
from .discriminator import PatchGANDiscriminator, adaptive_gan_weight, generator_gan_loss, hinge_d_loss
from .perceptual import LPIPSLoss, load_vgg_backbone_state
from .tokenizer_loss import TokenizerLoss, reconstruction_loss

__all__ = ["budget_loss", "PatchGANDiscriminator", "adaptive_gan_weight", "generator_gan_loss", "hinge_d_loss",
           "LPIPSLoss", "load_vgg_backbone_state", "TokenizerLoss", "reconstruction_loss"]
