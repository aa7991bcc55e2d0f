"""Fitting a compressed layer to its outputs on calibration data: the pure math.

Every data fit minimises the layer's output error on the calibration rows,

    || X w_o - X ŵ_o ||^2 + λ ||w_o - ŵ_o||^2 = (ŵ_o - w_o) (H + λI) (ŵ_o - w_o)^T,

summed over output rows ``o``, where ``H = X^T X`` is the second moment of the layer's inputs
(unfolded patches for convs, one ``H`` per group for grouped / depthwise convs; see
``autohybrid.stats``). The damping ``λ = damp · mean(diag H)`` pulls towards the dense weight,
not towards zero, so the fit at full rank / zero sparsity is the dense layer itself, and it
keeps every solve well posed: dead input channels (zero rows of ``H``) and fewer calibration
rows than columns included.

A ``FitProblem`` is (target weight, damped metric, raw ``H``). With inputs from the dense
model the target is the dense weight. For the sequential fit (inputs ``X̃`` from the model
compressed so far, targets from the dense model's outputs) the same problem arises with
``H̃ = X̃^T X̃`` and the target ``W* = W (C^T + λI)(H̃ + λI)^{-1}``, ``C = X̃^T X``:
``sequential_problem`` builds it, and every method fits it unchanged.

Functions take and return float64 matrices: ``(out, k)`` weights with rows grouped as PyTorch
groups them (contiguous blocks of ``out / G`` rows per group) and ``(G, k, k)`` moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DAMP",
    "SALIENCY",
    "SALIENCIES",
    "FitProblem",
    "damped",
    "problem_from_stats",
    "sequential_problem",
    "output_error",
    "relative_output_error",
    "saliency",
    "masked_lstsq",
    "whitened_lowrank",
    "refit_left",
    "reduced_rank",
    "spd_solve",
]

DAMP = 0.01
SALIENCIES = ("best", "obs", "wanda", "magnitude")
SALIENCY = "obs"


@dataclass
class FitProblem:
    """What a data fit approaches, in which metric.

    Attributes:
        target: weight-shaped float64 tensor: the weight whose outputs the fit approaches.
        metric: (G, k, k) float64, the damped second moment the error is measured in.
        raw: (G, k, k) float64, the undamped second moment (for the reported error).
        saliency: the mask saliency for sparse parts: ``obs``, ``wanda``, ``magnitude``, or
            ``best`` (each layer keeps whichever of OBS and Wanda fits its outputs better).
    """

    target: torch.Tensor
    metric: torch.Tensor
    raw: torch.Tensor
    saliency: str = SALIENCY

    @property
    def groups(self) -> int:
        return self.metric.shape[0]

    def matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (default: the target) as the (out, k) float64 matrix the math uses."""
        w = self.target if weight is None else weight
        return w.detach().double().reshape(w.shape[0], -1)


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` per group; an all-zero group gets ``damp · I``."""
    diag = h.diagonal(dim1=-2, dim2=-1)
    scale = diag.mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(h.shape[-1], dtype=h.dtype)
    return h + (damp * scale)[:, None, None] * eye


def problem_from_stats(
    weight: torch.Tensor, h: torch.Tensor, damp: float = DAMP, saliency: str = SALIENCY
) -> FitProblem:
    """The independent per-layer problem: inputs from the dense model, target its weight."""
    h = h.double()
    return FitProblem(weight.detach().double(), damped(h, damp), h, saliency)


def sequential_problem(
    weight: torch.Tensor,
    h_tilde: torch.Tensor,
    cross: torch.Tensor,
    damp: float = DAMP,
    saliency: str = SALIENCY,
) -> FitProblem:
    """The problem for inputs ``X̃`` from the compressed model and dense targets ``X W^T``.

    ``h_tilde = X̃^T X̃`` and ``cross = X̃^T X`` (both (G, k, k)). The minimiser of
    ``||X w^T - X̃ ŵ^T||^2 + λ||ŵ - w||^2`` is ``ŵ* = w (C^T + λI)(H̃ + λI)^{-1}``, and the
    objective equals ``(ŵ - ŵ*)(H̃ + λI)(ŵ - ŵ*)^T`` plus a constant, so every method fits
    target ``W*`` in metric ``H̃ + λI``. With ``X̃ = X`` the target is ``W`` itself.
    """
    h_tilde, cross = h_tilde.double(), cross.double()
    metric = damped(h_tilde, damp)
    lam = (metric - h_tilde).diagonal(dim1=-2, dim2=-1)  # (G, k): λ on the diagonal
    w = weight.detach().double()
    g = metric.shape[0]
    wm = w.reshape(g, w.shape[0] // g, -1)  # (G, rows, k)
    rhs = wm @ cross.transpose(-1, -2)  # w C^T ... as rows: (G, rows, k) @ (G, k, k)^T
    rhs = rhs + wm * lam[:, None, :]
    # ŵ* = rhs · metric^{-1}  (metric symmetric)
    target = torch.linalg.solve(metric, rhs.transpose(-1, -2)).transpose(-1, -2)
    return FitProblem(target.reshape(w.shape), metric, h_tilde, saliency)


def _grouped(m: torch.Tensor, groups: int) -> torch.Tensor:
    return m.reshape(groups, m.shape[0] // groups, -1)


def output_error(err: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_o e_o H_g e_o^T`` for an (out, k) error matrix and (G, k, k) moments."""
    e = _grouped(err.double(), h.shape[0])
    return float(torch.einsum("gok,gkl,gol->", e, h, e))


def relative_output_error(problem: FitProblem, approx: torch.Tensor) -> float:
    """sqrt(output error of ``approx`` / output energy of the target), raw ``H``."""
    t = problem.matrix()
    den = output_error(t, problem.raw)
    num = output_error(t - problem.matrix(approx), problem.raw)
    if den <= 0:
        return float(num**0.5)
    return float(max(num, 0.0) / den) ** 0.5


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^{-1} b`` for symmetric positive semi-definite ``a`` (batched); a tiny jitter, then
    the pseudo-inverse, where Cholesky fails (degenerate factors)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)[..., None, None]
    for jitter in (0.0, 1e-12, 1e-9):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        if not bool((info != 0).any()):
            return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(a, hermitian=True) @ b


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor, with a tiny relative jitter where ``a`` is only semi-definite."""
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-300)
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    for jitter in (0.0, 1e-12, 1e-9, 1e-6):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale * eye)
        if not bool((info != 0).any()):
            return chol
    raise torch.linalg.LinAlgError("second moment is not positive definite; raise the damping")


# -- sparse -------------------------------------------------------------------------------


def saliency(problem: FitProblem, w: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """Per-entry importance of the (out, k) matrix ``w``: OBS ``w^2 / [H^{-1}]_jj``
    (SparseGPT) or Wanda's ``|w| · sqrt(H_jj)``, each with its row's group's ``H``; or plain
    ``|w|`` (``magnitude``: the weight fit's mask, values still refit)."""
    kind = kind or problem.saliency
    if kind == "best":
        kind = "obs"
    g = problem.groups
    if kind == "wanda":
        d = problem.raw.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (G, k)
        return (_grouped(w, g).abs() * d[:, None, :]).reshape(w.shape)
    if kind == "obs":
        inv_diag = torch.cholesky_inverse(_cholesky(problem.metric))
        inv_diag = inv_diag.diagonal(dim1=-2, dim2=-1)  # (G, k)
        return (_grouped(w, g) ** 2 / inv_diag[:, None, :]).reshape(w.shape)
    if kind == "magnitude":  # the weight fit's mask; only the kept values are fitted
        return w.abs()
    raise ValueError(f"unknown saliency {kind!r}; use one of {list(SALIENCIES)}")


def masked_lstsq(
    target: torch.Tensor, metric: torch.Tensor, mask: torch.Tensor, chunk_entries: int = 2**24
) -> torch.Tensor:
    """Exact damped least squares of each row's kept entries for a fixed mask.

    Row ``o`` (group ``g``): ``ŵ_M = argmin (ŵ - t_o) H_g (ŵ - t_o)^T`` over ``ŵ`` supported on
    ``M = mask[o]``, i.e. ``H_g[M, M] ŵ_M = (t_o H_g)_M``. Rows are solved in batches on their
    kept coordinates only (a row's system is |M| x |M|, not k x k): each row's kept columns
    are gathered, rows with fewer than the batch's largest count are padded with identity
    rows and zero right-hand sides, and one batched Cholesky solves them all. Returns (out, k)
    with zeros off the mask.
    """
    out_rows, k = target.shape
    g = metric.shape[0]
    per = out_rows // g
    rhs = (_grouped(target, g) @ metric).reshape(out_rows, k)  # rows of t_o H_g
    counts = mask.sum(1)
    order = torch.argsort(counts, stable=True)  # similar counts batch together: less padding
    result = torch.zeros_like(target)
    lo = 0
    while lo < out_rows:
        m = int(counts[order[lo]])
        hi = lo + 1
        while hi < out_rows and (hi - lo + 1) * int(counts[order[hi]]) ** 2 <= chunk_entries:
            hi += 1
        rows = order[lo:hi]
        m = int(counts[rows].max())
        lo_next = hi
        if m == 0:
            lo = lo_next
            continue
        # kept columns first (in column order), then padding
        cols = torch.argsort((~mask[rows]).to(torch.int8), dim=1, stable=True)[:, :m]
        valid = torch.arange(m)[None, :] < counts[rows][:, None]  # (c, m)
        h = metric[rows // per]  # (c, k, k)
        sub = torch.gather(h, 1, cols[:, :, None].expand(-1, -1, k))
        sub = torch.gather(sub, 2, cols[:, None, :].expand(-1, m, -1))  # (c, m, m)
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(m, dtype=metric.dtype)
        sub = torch.where(pair, sub, torch.zeros((), dtype=sub.dtype)) \
            + (~valid).to(sub.dtype)[:, :, None] * eye
        b = torch.where(valid, torch.gather(rhs[rows], 1, cols), torch.zeros((), dtype=rhs.dtype))
        x = spd_solve(sub, b.unsqueeze(-1)).squeeze(-1) * valid
        vals = torch.zeros(len(rows), k, dtype=target.dtype)
        vals.scatter_(1, cols, x)
        result[rows] = vals * mask[rows]
        lo = lo_next
    return result


# -- low rank -----------------------------------------------------------------------------


def whitened_lowrank(
    target: torch.Tensor, metric: torch.Tensor, r: int, cache: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` minimiser of ``||(T - B A) L||_F``, ``H = L L^T`` (SVD-LLM): the SVD of
    ``T L`` truncated, whitening undone. Optimal (Eckart-Young in the whitened space): the
    squared error is the sum of the dropped squared singular values.

    Returns (A (r, k), B (out, r)) with the singular values split evenly. ``cache`` keeps the
    SVD of ``T L`` for every rank of the same ``target`` and ``metric``."""
    cache = {} if cache is None else cache
    if "wsvd" not in cache:
        chol = _cholesky(metric[0])
        u, s, vh = torch.linalg.svd(target @ chol, full_matrices=False)
        cache["wsvd"] = (chol, u, s, vh)
    chol, u, s, vh = cache["wsvd"]
    root = s[:r].sqrt()
    a = torch.linalg.solve_triangular(chol, root[:, None] * vh[:r], upper=False, left=False)
    return a, u[:, :r] * root[None, :]


def refit_left(target: torch.Tensor, metric: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Least-squares ``B = argmin ||(T - B F) L||`` for a fixed right factor ``F`` (r, k):
    ``B = T H F^T (F H F^T)^{-1}`` (the factor next to the output, refit; G = 1)."""
    h = metric[0]
    hf = h @ right.T  # (k, r)
    return spd_solve(right @ hf, (target @ hf).T).T


def reduced_rank(
    target: torch.Tensor, metric: torch.Tensor, proj: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` ``M`` minimising ``||(T - M P) L||`` for a fixed input map ``P`` (q, k):
    reduced-rank regression. ``M* = T H P^T (P H P^T)^{-1}`` is the unconstrained optimum and
    the error splits as ``||T - M* P||_H + ||M* - M||_{P H P^T}``, so the optimum is ``M*``
    truncated in the ``P H P^T`` metric. Returns (A (r, q), B (out, r)), ``M = B A``."""
    h = metric[0]
    hp = h @ proj.T  # (k, q)
    hz = proj @ hp  # (q, q)
    hz = 0.5 * (hz + hz.T)
    m_star = spd_solve(hz, (target @ hp).T).T  # (out, q)
    return whitened_lowrank(m_star, hz[None], r)
