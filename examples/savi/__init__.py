"""Semi-amortized variational inference (Kim et al. 2018, arXiv:1802.02550) three ways.

The model (after Dai et al. 2019, arXiv:1912.10702): z ~ N(0, I_d), x | z ~ N(MLP_θ(z), γI),
a diagonal Gaussian q_λ(z | x) with λ = (mean, log-std). Modules:

- `savi.model`: decoder, encoder, the ELBO on fixed noise, the importance-weighted bound,
  the importance-sampled log-likelihood, KL and active units;
- `savi.refine`: the inner problem max_λ ELBO(λ; θ, x), solved by natural-gradient
  ascent, differentiated by unrolling or by ``structift.implicit.custom_root``;
- `savi.train`: the digits split and the three trainers (VAE, SA-VAE, IFT);
- `savi.measure`: gradient agreement, memory and time against the number of steps K;
- `savi.report`: tables and figures.
"""
