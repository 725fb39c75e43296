"""Scoring generated images: Inception features, references, FID/IS/KID/precision-recall and the
image metrics (PSNR, Frechet distance) the score stage and the tokenizer eval share."""
