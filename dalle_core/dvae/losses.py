"""The dVAE objective: the evidence lower bound (ELB) with a logit-Laplace
likelihood and a gumbel-softmax relaxation (paper section 2.1, appendix A.3).

Per image, the loss minimised is

    -ELB / n_values = ( sum_pixels NLL_logit-Laplace(x | z)  +  beta * sum_positions KL(q(z|x) || U) ) / n_values

with n_values = C * H * W, the number of pixel values (256 * 256 * 3 for the
paper), and then averaged over the batch. So `recon` is the negative
log-likelihood in nats per pixel value and `kl` the KL in nats per pixel value
(the per-position KL, summed over the code grid, divided by n_values); `total` =
recon + beta * kl.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import logit_laplace_eps, map_pixels

__all__ = [
    "logit_laplace_nll",
    "kl_to_uniform",
    "marginal_kl_to_uniform",
    "pixel_mse",
    "gumbel_softmax_relaxation",
    "elb_loss",
    "code_stats",
    "map_pixels",
]


def logit_laplace_nll(x_mapped: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Negative log-density of the logit-Laplace distribution, elementwise.

    The paper's density on (0, 1) (appendix A.3) with location mu and scale b:

        f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)

    i.e. a Laplace on logit(x), pushed through the sigmoid. `x_mapped` are pixels
    after `map_pixels` (in [eps, 1 - eps], so logit(x) is finite); `mu` and
    `log_scale` = ln(b) are the decoder's two output halves. The terms
    log x + log(1 - x) + log 2 do not depend on the model; they are kept so the
    value is a true NLL (it can be negative: a density may exceed 1).
    """
    x = x_mapped.float()
    mu = mu.float()
    log_scale = log_scale.float()
    logit_x = torch.log(x) - torch.log1p(-x)
    return (math.log(2.0) + log_scale + torch.log(x) + torch.log1p(-x)
            + torch.abs(logit_x - mu) * torch.exp(-log_scale))


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) per code position, q = softmax(encoder logits) over dim 1.

    logits [B, K, h, w] -> [B, h, w]: sum_k q_k log q_k + log K. The paper's KL
    term uses the encoder logits (not the relaxed sample), against a uniform prior.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(dim=1) + math.log(logits.shape[1])


def marginal_kl_to_uniform(logits: torch.Tensor, reduce=None) -> torch.Tensor:
    """KL(q_bar || uniform) of the batch's *average* code distribution (a scalar).

    q_bar = mean over images and positions of softmax(logits). Unlike the
    per-position KL of the ELB, which pushes every position towards an
    uncertain code, this term is small only when the batch as a whole spreads
    over the codebook: it penalises collapse onto a few codes without making
    any single code choice less confident (the "diversity loss" of wav2vec 2.0,
    Baevski et al. 2020). Not in the paper; off (weight 0) in its presets.
    """
    q_bar = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
    if reduce is not None:  # data parallel: this rank's share -> the global batch's average (train.py)
        q_bar = reduce(q_bar)
    return (q_bar * q_bar.clamp_min(1e-12).log()).sum() + math.log(logits.shape[1])


def pixel_mse(images: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the decoded image, unmap(sigmoid(mu)) - what
    `decode_codes` returns - against the input in [0, 1] (a scalar).

    As a loss term with weight w it is a Gaussian likelihood with a fixed
    sigma = (2 w)^-1/2 next to the logit-Laplace. Its point: the logit-Laplace,
    with its learned scale, is L1-like and spends a short run on the many small
    errors of a textured background, while the few large errors at object edges
    (what makes a circle a circle) cost it little; squared errors weigh them
    most. Not in the paper; off (weight 0) in its presets.
    """
    # unmap_pixels without its clamp to [0, 1], which would stop the gradient of
    # a pixel predicted beyond black or white
    decoded = (torch.sigmoid(mu.float()) - logit_laplace_eps) / (1 - 2 * logit_laplace_eps)
    return F.mse_loss(decoded, images.float())


def gumbel_softmax_relaxation(logits: torch.Tensor, temperature: float, dim: int = 1,
                              generator: torch.Generator | None = None,
                              uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """A relaxed one-hot sample: softmax((logits + g) / temperature), g ~ Gumbel(0, 1).

    The same computation as torch.nn.functional.gumbel_softmax(hard=False),
    written out so that the noise can come from the trainer's own
    `torch.Generator`: a resumed run then redraws exactly the same noise, no
    matter what else used torch's global RNG (data loading, augmentation).
    The paper trains on the soft relaxation (no straight-through estimator);
    the gradient flows to the encoder logits through the softmax. As the
    temperature falls the sample tends to a one-hot vector.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    # -log(-log U), U ~ U(0, 1), is a standard Gumbel sample. Drawn from uniforms
    # rather than F.gumbel_softmax's Exp(1) draws: on a CPU exponential_ is 5x
    # slower than rand and was 14% of a small dVAE training step (measured).
    tiny = torch.finfo(torch.float32).tiny
    # `uniforms`: U(0, 1) draws of the logits' shape made by the caller (the data-parallel
    # trainer draws them per image, so any split of the batch over ranks draws the same)
    u = uniforms.float().clamp(tiny, 1.0 - 2**-24) if uniforms is not None else \
        torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(tiny, 1.0 - 2**-24)
    gumbels = -(-u.log()).log()
    return F.softmax((logits + gumbels) / temperature, dim=dim)


def elb_loss(images: torch.Tensor, logits: torch.Tensor, decoder_out: torch.Tensor,
             kl_weight: float, marginal_kl_weight: float = 0.0,
             pixel_mse_weight: float = 0.0, marginal_reduce=None) -> dict[str, torch.Tensor]:
    """The ELB loss of a batch, normalised per pixel value (see the module docstring).

    images: targets in [0, 1], [B, C, H, W] (mapped here with map_pixels);
    logits: encoder logits [B, K, h, w]; decoder_out: [B, 2C, H, W] (mu, ln b).
    Returns {"total", "recon", "kl"}: scalars, each in nats per pixel value,
    averaged over the batch; total = recon + kl_weight * kl (+ the optional
    marginal KL and pixel MSE terms, also returned, with their weights).
    `marginal_reduce` (data parallel): maps this batch's average code distribution
    to the global batch's, so the marginal KL is that of the whole global batch.
    """
    b, c, h, w = images.shape
    if decoder_out.shape != (b, 2 * c, h, w):
        raise ValueError(f"decoder output shape {tuple(decoder_out.shape)} does not match "
                         f"images {tuple(images.shape)} (expected {(b, 2 * c, h, w)})")
    n_values = c * h * w  # 256 * 256 * 3 in the paper
    x = map_pixels(images.float())
    mu, log_scale = decoder_out[:, :c], decoder_out[:, c:]
    recon = logit_laplace_nll(x, mu, log_scale).flatten(1).sum(1) / n_values
    kl = kl_to_uniform(logits).flatten(1).sum(1) / n_values
    recon, kl = recon.mean(), kl.mean()
    out = {"total": recon + kl_weight * kl, "recon": recon, "kl": kl}
    if marginal_kl_weight:
        # per pixel value like the KL: the marginal KL counts once per code position
        positions = logits.shape[2] * logits.shape[3]
        out["marginal_kl"] = marginal_kl_to_uniform(logits, marginal_reduce) * positions / n_values
        out["total"] = out["total"] + marginal_kl_weight * out["marginal_kl"]
    if pixel_mse_weight:
        out["pixel_mse"] = pixel_mse(images, mu)
        out["total"] = out["total"] + pixel_mse_weight * out["pixel_mse"]
    return out


@torch.no_grad()
def code_stats(logits: torch.Tensor) -> dict[str, float]:
    """Codebook health of a batch: `usage` = fraction of the vocabulary that is
    the argmax somewhere in the batch; `perplexity` = exp(entropy) of the
    average code distribution (mean of softmax(logits) over batch and positions);
    `hard_perplexity` the same for the argmax histogram."""
    k = logits.shape[1]
    codes = logits.argmax(dim=1).flatten()
    counts = torch.bincount(codes, minlength=k).float()
    usage = float((counts > 0).float().mean())
    p_soft = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
    p_hard = counts / counts.sum()

    def perplexity(p: torch.Tensor) -> float:
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    return {"usage": usage, "perplexity": perplexity(p_soft), "hard_perplexity": perplexity(p_hard)}
