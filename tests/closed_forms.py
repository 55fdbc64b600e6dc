"""The papers' closed forms, written out here in float64 one value at a time: the tests' one oracle.

DDPM (Ho et al. 2020) eq. 2, 4, 5, 6, 7, 13 and section 4; Improved DDPM (Nichol & Dhariwal 2021) eq. 15, 17 and
section 4. Plain Python loops, math, numpy, scipy and mpmath: nothing here imports or copies hf_ddpm, so an error in
the package cannot hide in its own oracle.
"""

import math

import mpmath
import numpy as np
from scipy.stats import norm

BIN_HALF_WIDTH = 1.0 / 255.0  # pixels k/127.5 - 1 own bins of width 2/255 (DDPM eq. 13)

# ---------------------------------------------------------------- β schedules (DDPM section 4, Improved DDPM eq. 17)


def linear_betas(T: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """β_t = start + (end - start) · t / (T - 1) (DDPM section 4: T = 1000, 1e-4 .. 0.02)."""
    if T == 1:
        return np.array([start])
    return np.array([start + (end - start) * t / (T - 1) for t in range(T)])


def scaled_linear_betas(T: int, start: float, end: float) -> np.ndarray:
    """sqrt(β_t) linear from sqrt(start) to sqrt(end)."""
    lo, hi = math.sqrt(start), math.sqrt(end)
    return np.array([(lo + (hi - lo) * t / (T - 1)) ** 2 for t in range(T)])


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2); β_t = min(1 - f(t+1)/f(t), 0.999)."""

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1.0 - f(t + 1) / f(t), max_beta) for t in range(T)])


def sigmoid_betas(T: int, start: float, end: float) -> np.ndarray:
    """β_t = start + (end - start) / (1 + exp(-u_t)), u_t = -6 + 12 t / (T - 1) (GeoDiff)."""
    return np.array([start + (end - start) / (1.0 + math.exp(-(-6.0 + 12.0 * t / (T - 1)))) for t in range(T)])


def alphas_cumprod(betas) -> np.ndarray:
    """ᾱ_t = Π_{s<=t} (1 - β_s) (DDPM eq. 4), a running product in Python floats."""
    out, running = [], 1.0
    for beta in betas:
        running *= 1.0 - float(beta)
        out.append(running)
    return np.array(out)


LINEAR_BETAS = linear_betas()  # the paper's schedule: T = 1000, β from 1e-4 to 0.02
LINEAR_AC = alphas_cumprod(LINEAR_BETAS)

# ---------------------------------------------------------------- forward process and posterior (eq. 2, 4, 6, 7)


def compose_forward(betas, first: int, last: int) -> tuple[float, float]:
    """q(x_last | x_{first-1}) = N(a x, v) by composing DDPM eq. 2 step by step: x_j = sqrt(1 - β_j) x_{j-1} + sqrt(β_j) ε."""
    a, v = 1.0, 0.0
    for j in range(first, last + 1):
        a *= math.sqrt(1.0 - betas[j])
        v = (1.0 - betas[j]) * v + betas[j]
    return a, v


def posterior(ac_t: float, ac_prev: float, beta_t: float | None = None) -> tuple[float, float, float]:
    """(coef_x0, coef_xt, β̃) of q(x_prev | x_t, x_0) (DDPM eq. 6, 7); β_t = 1 - ᾱ_t/ᾱ_prev when not given
    (Improved DDPM section 4, respaced chains)."""
    if beta_t is None:
        beta_t = 1.0 - ac_t / ac_prev
    coef_x0 = math.sqrt(ac_prev) * beta_t / (1.0 - ac_t)
    coef_xt = math.sqrt(1.0 - beta_t) * (1.0 - ac_prev) / (1.0 - ac_t)
    return coef_x0, coef_xt, (1.0 - ac_prev) / (1.0 - ac_t) * beta_t


def moments_on_a_grid(log_density) -> tuple[float, float]:
    """Mean and variance of an unnormalized 1-D density by summing on a grid: a coarse pass over [-20, 20] finds
    the mass, a fine one over ±15 standard deviations measures it (a Riemann sum is exact to rounding for smooth,
    fast-decaying densities)."""
    mean, std = 0.0, 20.0 / 15.0
    for n in (400_001, 200_001):
        y = np.linspace(mean - 15 * std, mean + 15 * std, n)
        log_p = log_density(y)
        w = np.exp(log_p - log_p.max())
        mean = (y * w).sum() / w.sum()
        var = ((y - mean) ** 2 * w).sum() / w.sum()
        std = math.sqrt(var)
    return mean, var


# ---------------------------------------------------------------- the bound's terms (eq. 5, 13)


def gaussian_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) elementwise, numpy."""
    return 0.5 * (np.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1.0)


def bin_probability_erf(x: float, mean: float, scale: float) -> float:
    """DDPM eq. 13 the plain way: Φ(upper) - Φ(lower) with math.erf; open bins at -1 and +1."""

    def cdf(z):
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    lower, upper = (x - BIN_HALF_WIDTH - mean) / scale, (x + BIN_HALF_WIDTH - mean) / scale
    if x < -0.999:
        return cdf(upper)
    if x > 0.999:
        return 1.0 - cdf(lower)
    return cdf(upper) - cdf(lower)


def bin_log_probability_mp(x: float, mean: float, scale: float) -> float:
    """log of the same bin probability with mpmath (50 digits, unbounded exponent): exact also deep in a tail."""
    with mpmath.workdps(50):
        x, mean, scale = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(scale)
        lower = (x - mpmath.mpf(1) / 255 - mean) / scale
        upper = (x + mpmath.mpf(1) / 255 - mean) / scale
        if x < -0.999:
            p = mpmath.ncdf(upper)
        elif x > 0.999:
            p = mpmath.ncdf(-lower)  # 1 - Φ(lower)
        elif lower > 0:
            p = mpmath.ncdf(-lower) - mpmath.ncdf(-upper)  # the same difference, mirrored to keep its digits
        else:
            p = mpmath.ncdf(upper) - mpmath.ncdf(lower)
        return float(mpmath.log(p))


def prior_kl(ac_last: float, x0):
    """L_T = KL(N(sqrt(ᾱ_{T-1}) x_0, 1 - ᾱ_{T-1}) || N(0, 1)) elementwise."""
    return 0.5 * (-np.log(1 - ac_last) + (1 - ac_last) + ac_last * np.asarray(x0) ** 2 - 1)


def fixed_small_bound_term(betas, x0, x_t, t: int, eps_hat) -> float:
    """One term of the bound in nats, summed over pixels, for an ε-prediction model with σ² = β̃_t (clipped to β̃_1
    at t = 0) and x̂_0 clipped to [-1, 1]: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) for t > 0,
    L_0 = -log p_θ(x_0 | x_1) (eq. 13) at t = 0."""
    ac = alphas_cumprod(betas)
    a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else 1.0)
    x0_hat = np.clip((x_t - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t), -1, 1)  # eq. 15 inverted, clipped
    coef_x0 = np.sqrt(a_prev) * betas[t] / (1 - a_t)  # eq. 7
    coef_xt = np.sqrt(1 - betas[t]) * (1 - a_prev) / (1 - a_t)
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    beta_tilde = betas * (1 - np.concatenate([[1.0], ac[:-1]])) / (1 - ac)
    var = beta_tilde[t] if t > 0 else beta_tilde[1]  # fixed_small, clipped at t = 0
    if t == 0:
        h = BIN_HALF_WIDTH
        lo = np.where(x0 < -0.999, -np.inf, x0 - h)
        hi = np.where(x0 > 0.999, np.inf, x0 + h)
        s = np.sqrt(var)
        p = norm.cdf((hi - model_mean) / s) - norm.cdf((lo - model_mean) / s)
        return -np.sum(np.log(p))
    true_mean = coef_x0 * x0 + coef_xt * x_t
    return np.sum(0.5 * (np.log(var / beta_tilde[t]) + beta_tilde[t] / var + (true_mean - model_mean) ** 2 / var - 1))


def point_mass_bound_nats(betas, c, variance_type: str) -> tuple[float, float, float]:
    """(L_T, Σ L_{t-1}, L_0) in nats of the perfect denoiser on data that is always c (pixel values in [-1, 1]).

    L_T = KL(N(sqrt(ᾱ_T) c, 1 - ᾱ_T) || N(0, 1)). For t >= 1 the model's mean is the true posterior mean, so
    L_{t-1} = D · KL(N(0, β̃_t) || N(0, σ_t²)): zero for σ² = β̃ (fixed_small), positive for σ² = β (fixed_large).
    L_0: pixels sit at their bin centres, the decoder mean is c and its variance β̃_1, so each interior pixel costs
    -log(Φ(h/σ) - Φ(-h/σ)) and each edge pixel (open bin) -log Φ(h/σ), h = 1/255.
    """
    ac = alphas_cumprod(betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    beta_tilde = betas * (1 - ac_prev) / (1 - ac)
    c = np.asarray(c).ravel()
    prior = np.sum(prior_kl(ac[-1], c))
    if variance_type == "fixed_small":
        kl = 0.0
    else:
        ratio = beta_tilde[1:] / betas[1:]
        kl = c.size * np.sum(0.5 * (-np.log(ratio) + ratio - 1))
    sigma = math.sqrt(beta_tilde[1])
    h = BIN_HALF_WIDTH
    edge = np.abs(c) == 1.0
    interior_p = norm.cdf(h / sigma) - norm.cdf(-h / sigma)
    decoder = -(np.sum(~edge) * np.log(interior_p) + np.sum(edge) * norm.logcdf(h / sigma))
    return prior, kl, decoder
