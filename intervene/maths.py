"""Pure tensor maths shared by live hooks and the bake. No module state, no I/O.

Every edit acts on the H axis of a tensor: each 1-D fibre along that axis is a vector in
residual space. For a write-side weight ``W [H, in]`` the fibres are its columns and
``project_out(W, r, axis=0)`` is ``W - s·r(rᵀW)``; for a read-side weight ``W [out, H]`` the
fibres are its rows and ``project_out(W, r, axis=1)`` is ``W - s·(W r)rᵀ``. The live hook on an
activation ``y [..., H]`` is ``project_out(y, r, axis=-1)``. One function, three uses.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError, MeasurementError

EPS = 1e-12


def unit(r: torch.Tensor, what: str = "direction") -> torch.Tensor:
    """``r / ‖r‖`` in float32; a named error for a zero or non-finite vector."""
    r = r.detach().to(torch.float32)
    if not torch.isfinite(r).all():
        raise MeasurementError(f"{what} contains NaN or Inf")
    norm = torch.linalg.vector_norm(r)
    if norm <= EPS:
        raise MeasurementError(f"{what} has zero norm")
    return r / norm


def project_out(t: torch.Tensor, r: torch.Tensor, axis: int, scale: float = 1.0) -> torch.Tensor:
    """Remove ``scale`` times the component along unit ``r`` from every fibre of ``t`` along ``axis``.

    Computed in float32 (or float64 if ``t`` is float64) and cast back to ``t``'s dtype. The rank-1 update
    runs in ``t``'s own memory layout (not on a ``movedim`` view, several times faster for ``axis != -1``,
    which the bake's streamed writer needs): ``c = fibres @ r``, ``t − (s·c) ⊗ r``, in that order.
    """
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    x = t.to(work)
    rr = r.to(device=x.device, dtype=work)
    coeff = x.movedim(axis, -1) @ rr  # [...]: each fibre's component along r
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return (x - (scale * coeff).unsqueeze(axis) * rr.reshape(shape)).to(t.dtype)


def norm_preserving_edit(t: torch.Tensor, r: torch.Tensor, axis: int, scale: float = 1.0) -> torch.Tensor:
    """grimjim's norm-preserving ablation: each fibre ``w`` along ``axis`` keeps ``‖w‖`` and gets the
    direction ``normalize(ŵ - s(ŵ·r)r)``. Zero fibres stay zero."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    x = t.to(work).movedim(axis, -1)
    rr = r.to(device=x.device, dtype=work)
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    w_hat = x / norms.clamp_min(EPS)
    v = w_hat - scale * (w_hat @ rr).unsqueeze(-1) * rr
    v_norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    out = torch.where(v_norm > EPS, v / v_norm.clamp_min(EPS) * norms, torch.zeros_like(v))
    return out.movedim(-1, axis).to(t.dtype)


def edit_tensor(t: torch.Tensor, r: torch.Tensor, axis: int, scale: float, method: str,
                is_bias: bool = False) -> torch.Tensor:
    """The one weight edit used by the bake and by in-memory live swaps.

    ``method='norm_preserving'`` applies to weights; a bias is one vector, not a set of input
    neurons' write vectors, so it always gets the plain projection.
    """
    if method == "norm_preserving" and not is_bias:
        return norm_preserving_edit(t, r, axis, scale)
    if method in ("project", "norm_preserving"):
        return project_out(t, r, axis, scale)
    raise ConfigError(f"unknown method '{method}'; valid: project, norm_preserving")


def biproject(r: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """Orthogonalise ``r`` against the normalised harmless mean: ``r - (r·m̂)m̂``."""
    m_hat = unit(harmless_mean, "harmless mean")
    r = r.to(torch.float32)
    return r - (r @ m_hat) * m_hat


def sparsify(r: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero all but the largest-magnitude ``(1 - sparsity)`` fraction of components."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return r
    return keep_largest(r, max(1, int(round((1.0 - sparsity) * r.numel()))))


def keep_largest(r: torch.Tensor, keep: int) -> torch.Tensor:
    """Zero all but the ``keep`` largest-magnitude components (the reference tool's ``sparsity: s``
    is ``keep = int(s · H)``)."""
    if not 1 <= keep <= r.numel():
        raise ConfigError(f"keep must be in 1..{r.numel()}, got {keep}")
    idx = torch.topk(r.abs(), keep, sorted=False).indices
    out = torch.zeros_like(r)
    out[idx] = r[idx]
    return out


def post_norm_direction(r_hat: torch.Tensor, norm_weight: torch.Tensor, offset: float) -> torch.Tensor:
    """Direction to project from a module whose output passes a per-channel norm ``(offset + w)``
    before the residual add (Gemma3). Making the module output orthogonal to
    ``r̃ = normalize((offset + w) ⊙ r̂)`` makes the norm's output orthogonal to ``r̂``."""
    return unit((offset + norm_weight.detach().to(torch.float32)) * r_hat.to(torch.float32),
                "post-norm rescaled direction")


def interpolate(directions: dict[int, torch.Tensor], position: float) -> torch.Tensor:
    """Direction at a fractional layer index: linear interpolation of the two neighbours."""
    lo = int(position // 1)
    frac = float(position - lo)
    if frac == 0.0:
        return directions[lo].to(torch.float32)
    hi = lo + 1
    return (1.0 - frac) * directions[lo].to(torch.float32) + frac * directions[hi].to(torch.float32)


def second_moment_eig(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs and trace of the uncentred second moment ``M = XᵀX / N`` of
    ``rows`` ``X [N, H]``, without forming ``M`` (an SVD of ``X``, float64: ``N·min(N, H)²``).

    Returns ``(eigvals [k], eigvecs [k, H], trace [1])`` in float64, ``k = min(rank, numerical
    rank of X)``, eigenvalues descending, each eigenvector's largest-magnitude entry positive.
    """
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise MeasurementError(f"second moment needs rows [N, H] with N >= 1, got shape {tuple(rows.shape)}")
    if rank < 1:
        raise ConfigError(f"whitening rank must be >= 1, got {rank}")
    x = rows.detach().to(torch.float64)
    n = x.shape[0]
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    # numerically zero pairs are dropped: their vectors are arbitrary and they carry no energy
    k = min(rank, int((s > s[0] * 1e-7).sum()) if s[0] > 0 else 1)
    vh = vh[:k]
    # sign convention (an eigenvector's sign is arbitrary): the largest-magnitude entry is positive
    lead = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))
    vh = vh * torch.where(lead < 0, -1.0, 1.0).to(vh.dtype)
    trace = (x * x).sum() / n
    return s[:k] ** 2 / n, vh, trace.reshape(1)


def whiten(d: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor, trace: torch.Tensor | float,
           lam: float) -> torch.Tensor:
    """The harmless-whitened direction ``f = (M + c·I)⁻¹ d``, ``c = lam·tr(M)/H``, rescaled to ``‖d‖``.

    ``M`` is given by its top eigenpairs ``(eigvals [k], eigvecs [k, H])`` and its trace; the energy
    the pairs miss, ``tr(M) - Σ eigvals``, is spread evenly over the other ``H - k`` directions
    (exact when ``k`` covers M's rank). ``f`` keeps the part of ``d`` that harmless activations
    rarely use, so projecting it out moves harmless outputs less; ``lam → ∞`` gives ``d`` back.
    ``lam <= 0`` is rejected (M is singular when there are fewer prompts than dimensions).
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
        raise ConfigError(f"whiten must be a finite number > 0, got {lam!r}")
    work = torch.float64
    dd = d.detach().to(work)
    e = eigvals.detach().to(work).reshape(-1)
    v = eigvecs.detach().to(work).reshape(e.numel(), -1)
    h = dd.numel()
    if v.shape[1] != h:
        raise MeasurementError(f"whitening eigenvectors have width {v.shape[1]}, the direction {h}")
    tr = float(trace.reshape(-1)[0]) if isinstance(trace, torch.Tensor) else float(trace)
    if not tr > 0:
        raise MeasurementError(f"harmless second moment has trace {tr}: nothing to whiten against")
    c = lam * tr / h
    rest = max(tr - float(e.sum()), 0.0) / (h - e.numel()) if h > e.numel() else 0.0
    p = v @ dd
    f = v.T @ (p / (e + c)) + (dd - v.T @ p) / (rest + c)
    norm = torch.linalg.vector_norm(f)
    if not norm > EPS:
        raise MeasurementError("whitened direction has zero norm")
    return (f * (torch.linalg.vector_norm(dd) / norm)).to(torch.float32)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = (p + q)/2``, in nats (0 ≤ JS ≤ ln 2).

    ``p`` and ``q`` are 1-D weights of the same length, renormalised to sum 1 (float64); a zero
    entry contributes nothing (0·log 0 = 0). NaN when either is not a distribution up to scale:
    a zero sum (nothing counted), a negative or a non-finite entry."""
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"js_divergence needs two 1-D vectors of one length, "
                         f"got {tuple(p.shape)} and {tuple(q.shape)}")
    p, q = p.detach().to(torch.float64), q.detach().to(torch.float64)
    for x in (p, q):
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or not float(x.sum()) > 0:
            return math.nan
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2

    def kl(a: torch.Tensor) -> float:
        support = a > 0  # mid > 0 wherever a > 0
        return float((a[support] * (a[support] / mid[support]).log()).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def risk_difference_ranking(harmful_freq: torch.Tensor, harmless_freq: torch.Tensor) -> list[int]:
    """Expert ids ordered by risk difference ``p_harmful[e] − p_harmless[e]`` (largest first; ties
    by id): the experts most over-selected on harmful prompts first. ``router_bias: top:N`` and
    ``analyze`` both rank with this."""
    diff = harmful_freq.detach().to(torch.float64) - harmless_freq.detach().to(torch.float64)
    return [int(e) for e in torch.argsort(diff, descending=True, stable=True)]


def add_selection_bias(t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``t + bias`` computed in float32 (float64 stays float64) and cast back to ``t``'s dtype: the
    one arithmetic of a router_bias, live (weight swap) and baked. ``-inf`` survives every cast."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.to(work) + bias.to(device=t.device, dtype=work)).to(t.dtype)


def routing_split(harmful_gated: torch.Tensor, harmless_gated: torch.Tensor, harmful_weight: torch.Tensor,
                  harmless_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the routed experts' write difference ``g_h − g_m`` into *which experts are chosen* and
    *what the chosen experts compute*, per expert (float64).

    ``*_gated [E, ...]``: each expert's mean gated output over a prompt set (routing weight multiplied in,
    0 where not chosen); ``*_weight [E]``: its mean routing weight ρ. ``u = g / ρ`` is the expert's mean
    output per unit of routing weight (where ρ = 0 in one set, the other set's u; 0 where both are 0).

    * ``compute = ρ_m · (u_h − u_m)``: the harmful prompts' expert outputs weighted with the harmless
      routing, minus the harmless write: what changes when only the experts' outputs change;
    * ``routing = (g_h − g_m) − compute`` (= ``(ρ_h − ρ_m) · u_h``): what changes with the routing.

    Returns ``(routing, compute)``, each shaped like ``harmful_gated``; they add up to ``g_h − g_m`` exactly."""
    if harmful_gated.shape != harmless_gated.shape or harmful_weight.shape != harmless_weight.shape \
            or harmful_weight.ndim != 1 or harmful_gated.shape[0] != harmful_weight.shape[0]:
        raise ValueError(f"routing_split needs gated [E, ...] and weights [E] of one E, got "
                         f"{tuple(harmful_gated.shape)}, {tuple(harmless_gated.shape)}, "
                         f"{tuple(harmful_weight.shape)}, {tuple(harmless_weight.shape)}")
    g_h, g_m = harmful_gated.detach().to(torch.float64), harmless_gated.detach().to(torch.float64)
    extra = (1,) * (g_h.ndim - 1)
    rho_h = harmful_weight.detach().to(torch.float64).reshape(-1, *extra)
    rho_m = harmless_weight.detach().to(torch.float64).reshape(-1, *extra)
    u_h = torch.where(rho_h > 0, g_h / torch.where(rho_h > 0, rho_h, 1.0), torch.zeros_like(g_h))
    u_m = torch.where(rho_m > 0, g_m / torch.where(rho_m > 0, rho_m, 1.0), torch.zeros_like(g_m))
    u_h = torch.where(rho_h > 0, u_h, u_m)  # never chosen on harmful prompts: nothing to compare, no compute part
    compute = rho_m * (u_h - u_m)
    return (g_h - g_m) - compute, compute
