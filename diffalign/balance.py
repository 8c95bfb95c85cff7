"""Multi-reward gradient harmonisation: the min-norm point of K gradients' convex hull (MGDA form).

MARBLE (Zhao et al., arXiv 2605.06507, §3.2, research/seed_algorithms.md §6) combines the per-reward
gradients ``g_k`` of one batch into one update direction by solving, on the ``K x K`` Gram matrix
``G_jk = <ghat_j, ghat_k>`` of the normalised gradients ``ghat_k = g_k / ||g_k||``,

    alpha* = argmin_{alpha in simplex} alpha^T G alpha,        d* = sum_k alpha*_k ghat_k,

(Désidéri's MGDA; Sener & Koltun 2018, eq. (3)), then rescales ``d = d* * mean_k ||g_k||``. The min-norm
point has ``<d*, ghat_k> >= ||d*||^2 >= 0`` for every k (first-order condition), so no reward's loss rises
to first order. Coefficients are smoothed across steps by an EMA (MARBLE §3.4, ``rho = 0.7``).

Solvers (all work on the Gram matrix, batched ``[..., K, K] -> [..., K]``, on the Gram's device):

* ``closed_form`` (K = 2): ``alpha_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``.
* ``enumerate`` (K <= 12): the optimum lies on a face of the simplex whose vertices are affinely
  independent, where it solves the equality-constrained KKT system ``[[G_S, -1], [1^T, 0]]``. Every support
  ``S`` is solved at once (batched ``linalg.solve``); each solution is clamped and renormalised into a
  genuinely feasible point and the one of least objective wins. Exact up to float64 round-off, no tuning.
* ``frank_wolfe``: exact line search; the step weight goes on the NEW vertex,
  ``gamma = (w^T G w - (G w)_t) / (w^T G w + G_tt - 2 (G w)_t)`` (research/environment.md §4.2).
* ``projected_gradient``: FISTA with step ``1 / (2 lambda_max(G))`` and a sort-based simplex projection.
* :func:`min_norm_cvxpy`: the cvxpy reference (test oracle).

Everything here is pure math on tensors except :class:`Harmonizer` (the EMA of the coefficients, with a
``state_dict``) and :class:`RewardGradients` (per-reward gradient buffers of a parameter list, all-reduced
over ranks before the QP so every rank solves the same problem).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "SOLVERS",
    "min_norm_coefficients",
    "min_norm_closed_form",
    "min_norm_enumerate",
    "min_norm_frank_wolfe",
    "min_norm_projected_gradient",
    "min_norm_cvxpy",
    "project_simplex",
    "gram_matrix",
    "pairwise_cosines",
    "direction_cosines",
    "between_batch_cosines",
    "between_batch_cosines_se",
    "ema_coefficients",
    "Harmonized",
    "harmonize",
    "Harmonizer",
    "RewardGradients",
    "log_harmonized",
    "cosine_summary",
]

SOLVERS = ("auto", "closed_form", "enumerate", "frank_wolfe", "projected_gradient")
#: ``enumerate`` solves 2^K - 1 KKT systems of size K + 1; beyond this ``auto`` uses projected gradient.
MAX_ENUMERATE_K = 12


# ----------------------------------------------------------------------------------------- QP solvers


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 wherever the backend has it: ill-conditioned Grams need it (the problem is tiny anyway)
    return torch.float32 if device.type == "mps" else torch.float64


def _objective(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("...i,...ij,...j->...", w, gram, w)


def _as_batch(gram: torch.Tensor) -> torch.Tensor:
    if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be [..., K, K], got shape {tuple(gram.shape)}")
    g = gram.to(_work_dtype(gram.device))
    return 0.5 * (g + g.transpose(-1, -2))  # exact symmetry; round-off in a Gram is not a signal


def min_norm_closed_form(gram: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` min-norm coefficients of two vectors (Sener & Koltun 2018, Algorithm 1 line-search form)."""
    g = _as_batch(gram)
    if g.shape[-1] != 2:
        raise ValueError(f"closed_form needs K = 2, got K = {g.shape[-1]}; use method='auto'")
    g11, g22, g12 = g[..., 0, 0], g[..., 1, 1], g[..., 0, 1]
    denom = g11 + g22 - 2 * g12
    safe = denom > torch.finfo(g.dtype).eps * (g11 + g22).clamp_min(torch.finfo(g.dtype).tiny)
    a = torch.where(safe, (g22 - g12) / torch.where(safe, denom, torch.ones_like(denom)), torch.full_like(denom, 0.5))
    a = a.clamp(0.0, 1.0)
    return torch.stack([a, 1 - a], dim=-1)


def _supports(k: int, device: torch.device) -> torch.Tensor:
    rows = [[(s >> i) & 1 for i in range(k)] for s in range(1, 2**k)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def min_norm_enumerate(gram: torch.Tensor, feasibility_tol: float = 1e-9) -> torch.Tensor:
    """``[..., K]`` exact min-norm coefficients by solving the KKT system of every support (K <= 12).

    For support ``S`` the stationary point of ``w^T G w`` on ``{sum w = 1, w_j = 0 for j not in S}`` solves
    ``G_S w_S = mu 1, 1^T w_S = 1``. Candidates with ``w_S >= -tol`` are clamped and renormalised (so each
    is a feasible point whatever the conditioning) and the least objective is returned; singletons are
    always candidates, and the optimum's support (affinely independent vertices) is always solvable.
    """
    g = _as_batch(gram)
    k = g.shape[-1]
    if k > MAX_ENUMERATE_K:
        raise ValueError(f"enumerate handles K <= {MAX_ENUMERATE_K} (2^K supports), got K = {k}")
    batch = g.shape[:-2]
    g = g.reshape(-1, k, k)
    p = g.shape[0]
    masks = _supports(k, g.device)  # [S, K]
    s = masks.shape[0]
    mf = masks.to(g.dtype)
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    # [P, S, K, K]: G on the support, identity elsewhere (forces w_j = 0 off the support)
    inner = g[:, None] * (mf[:, :, None] * mf[:, None, :]) + eye * (1 - mf)[:, :, None]
    kkt = torch.zeros(p, s, k + 1, k + 1, dtype=g.dtype, device=g.device)
    kkt[..., :k, :k] = inner
    kkt[..., :k, k] = -mf
    kkt[..., k, :k] = mf
    rhs = torch.zeros(p, s, k + 1, 1, dtype=g.dtype, device=g.device)
    rhs[..., k, 0] = 1.0
    sol, info = torch.linalg.solve_ex(kkt, rhs)
    w = sol[..., :k, 0]
    ok = (info == 0) & torch.isfinite(w).all(-1) & ((w >= -feasibility_tol) | ~masks).all(-1)
    w = w.clamp_min(0.0) * mf
    total = w.sum(-1, keepdim=True)
    ok = ok & (total[..., 0] > 0)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    obj = torch.einsum("psi,pij,psj->ps", w, g, w)
    obj = torch.where(ok, obj, torch.full_like(obj, float("inf")))
    best = obj.argmin(dim=1)
    out = w[torch.arange(p, device=g.device), best]
    return out.reshape(*batch, k)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``[..., K]`` onto the probability simplex (Duchi et al. 2008, Fig. 1)."""
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    cond = u - css / idx > 0
    rho = (cond * idx).argmax(-1, keepdim=True)  # last index where the condition holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0.0)


def min_norm_frank_wolfe(gram: torch.Tensor, max_iter: int = 1000, tol: float = 1e-12) -> torch.Tensor:
    """``[..., K]`` min-norm coefficients by Frank–Wolfe with exact line search (Jaggi 2013; MGDA-UB).

    Converges sublinearly; fine for well-conditioned Grams, use ``enumerate`` for exact answers.
    """
    g = _as_batch(gram)
    k = g.shape[-1]
    w = torch.full(g.shape[:-1], 1.0 / k, dtype=g.dtype, device=g.device)
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    for _ in range(max_iter):
        gw = (g @ w[..., None])[..., 0]
        wgw = (w * gw).sum(-1)
        t = gw.argmin(-1, keepdim=True)
        gwt = gw.gather(-1, t)[..., 0]
        gtt = torch.diagonal(g, dim1=-2, dim2=-1).gather(-1, t)[..., 0]
        gap = wgw - gwt  # >= 0; the FW duality gap / 2
        denom = wgw + gtt - 2 * gwt
        gamma = torch.where(denom > 0, gap / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.ones_like(denom)).clamp(0.0, 1.0)
        w = (1 - gamma)[..., None] * w + gamma[..., None] * eye[t[..., 0]]
        if bool((gap <= tol * wgw.abs().clamp_min(torch.finfo(g.dtype).tiny)).all()):
            break
    return w


def min_norm_projected_gradient(gram: torch.Tensor, max_iter: int = 3000, tol: float = 1e-14) -> torch.Tensor:
    """``[..., K]`` min-norm coefficients by accelerated projected gradient (FISTA, Beck & Teboulle 2009)."""
    g = _as_batch(gram)
    k = g.shape[-1]
    lmax = torch.linalg.eigvalsh(g)[..., -1].clamp_min(torch.finfo(g.dtype).tiny)
    step = (1.0 / (2 * lmax))[..., None]
    w = torch.full(g.shape[:-1], 1.0 / k, dtype=g.dtype, device=g.device)
    y, t = w.clone(), 1.0
    for _ in range(max_iter):
        w_new = project_simplex(y - step * 2 * (g @ y[..., None])[..., 0])
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_new + ((t - 1) / t_new) * (w_new - w)
        done = bool(((w_new - w).abs().max() <= tol))
        w, t = w_new, t_new
        if done:
            break
    return w


def min_norm_coefficients(gram: torch.Tensor, method: str = "auto", **kwargs) -> torch.Tensor:
    """``[..., K]`` coefficients on the simplex minimising ``alpha^T G alpha`` for ``gram`` ``[..., K, K]``.

    ``method``: ``auto`` (closed form for K = 2, ``enumerate`` for K <= 12, else ``projected_gradient``),
    or one of :data:`SOLVERS`. Runs on ``gram``'s device in float64 and returns that dtype.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    k = gram.shape[-1]
    if k == 1:
        return torch.ones(gram.shape[:-1], dtype=_work_dtype(gram.device), device=gram.device)
    if method == "auto":
        method = "closed_form" if k == 2 else "enumerate" if k <= MAX_ENUMERATE_K else "projected_gradient"
    fn = {"closed_form": min_norm_closed_form, "enumerate": min_norm_enumerate,
          "frank_wolfe": min_norm_frank_wolfe, "projected_gradient": min_norm_projected_gradient}[method]
    return fn(gram, **kwargs)


def min_norm_cvxpy(gram: torch.Tensor, solver: str = "CLARABEL") -> torch.Tensor:
    """Reference solution with cvxpy (``[K, K]`` or batched ``[..., K, K]``; a loop of solves on the CPU)."""
    import cvxpy as cp
    import numpy as np

    g = _as_batch(gram).cpu().numpy()
    k = g.shape[-1]
    flat = g.reshape(-1, k, k)
    out = []
    for m in flat:
        # factor G = L^T L through its eigendecomposition: robust for PSD matrices of any conditioning
        vals, vecs = np.linalg.eigh(m)
        lmat = np.sqrt(np.clip(vals, 0, None))[:, None] * vecs.T
        w = cp.Variable(k)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(lmat @ w)), [w >= 0, cp.sum(w) == 1])
        opts = dict(tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14, tol_ktratio=1e-12,
                    max_iter=500) if solver == "CLARABEL" else {}
        prob.solve(solver=solver, **opts)
        out.append(np.clip(np.asarray(w.value, dtype=np.float64), 0, None))
    res = torch.tensor(np.stack(out), dtype=torch.float64).reshape(*g.shape[:-1])
    return res / res.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------- diagnostics


def gram_matrix(grads: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``[K, K]`` float64 Gram matrix of ``grads`` ``[K, D]`` (accumulated over chunks of D in float64)."""
    k, d = grads.shape
    dt = _work_dtype(grads.device)
    out = torch.zeros(k, k, dtype=dt, device=grads.device)
    for start in range(0, d, chunk):
        block = grads[:, start:start + chunk].to(dt)
        out += block @ block.T
    return out


def pairwise_cosines(gram: torch.Tensor) -> torch.Tensor:
    """``[K, K]`` cosines ``G_ij / sqrt(G_ii G_jj)`` (0 where a gradient is zero)."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = d[..., :, None] * d[..., None, :]
    return torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.zeros_like(gram))


def direction_cosines(grads: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[K]`` cosine between each row of ``grads`` ``[K, D]`` and ``direction`` ``[D]`` (MARBLE Table S1:
    ``min_k`` of this is the worst-reward cosine; negative means the step raises that reward's loss)."""
    dt = _work_dtype(grads.device)
    g, d = grads.to(dt), direction.to(dt)
    denom = g.norm(dim=-1) * d.norm()
    dots = g @ d
    return torch.where(denom > 0, dots / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dots))


def ema_coefficients(previous: Optional[torch.Tensor], current: torch.Tensor, rho: float) -> torch.Tensor:
    """``rho * previous + (1 - rho) * current`` (MARBLE §3.4); stays on the simplex. ``previous=None``
    starts the average at ``current``."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    if previous is None:
        return current.clone()
    return rho * previous.to(current) + (1 - rho) * current


# ----------------------------------------------------------------------------------------- one harmonisation


@dataclass
class Harmonized:
    """Result of :func:`harmonize` for ``K`` rewards and ``D`` parameters.

    Attributes:
        direction: ``[D]`` the combined gradient (``d* * mean ||g_k||``), in the gradients' dtype.
        alpha: ``[K]`` float64 QP solution (0 for rewards whose gradient is zero).
        grad_norms: ``[K]`` float64 ``||g_k||``.
        gram: ``[K, K]`` float64 Gram matrix of the normalised gradients the QP solved on.
        cosines: ``[K]`` float64 ``cos(direction, g_k)`` with this batch's gradients.
        solve_seconds: wall time of the QP solve alone.
        tracked_cosines: ``[K]`` ``cos(direction, y_k)`` with the averaged gradients when the QP solved on
            those (:class:`Harmonizer` ``grad_ema``), else ``None``.
    """

    direction: torch.Tensor
    alpha: torch.Tensor
    grad_norms: torch.Tensor
    gram: torch.Tensor
    cosines: torch.Tensor
    solve_seconds: float
    tracked_cosines: Optional[torch.Tensor] = None


def harmonize(
    grads: torch.Tensor,
    *,
    normalize: bool = True,
    rescale: bool = True,
    method: str = "auto",
    eps: float = 1e-12,
) -> Harmonized:
    """MARBLE's full harmonisation of ``grads`` ``[K, D]`` (seed_algorithms.md §6.2 steps 3-5).

    ``normalize``: solve on unit gradients (the ablation without it fails, MARBLE Table 3); ``rescale``:
    multiply the min-norm point of the unit gradients by the mean gradient norm (of the rewards in the QP), which
    restores the gradients' scale. Without ``normalize`` the direction is the min-norm point of the raw gradients
    (MGDA), already at their scale, and ``rescale`` does nothing (before, it multiplied that point by the mean
    norm again, so the step grew with the square of the gradients). Rewards whose gradient norm
    is ``<= eps`` (no signal in this batch) are left out of the QP with ``alpha_k = 0`` and out of that mean;
    otherwise one zero gradient would make the min-norm point 0 and stop training.
    """
    k = grads.shape[0]
    dt = _work_dtype(grads.device)
    norms = grads.to(dt).norm(dim=1)
    active = norms > eps
    alpha = torch.zeros(k, dtype=dt, device=grads.device)
    gram_full = gram_matrix(grads)
    scale = torch.where(active, norms, torch.ones_like(norms)) if normalize else torch.ones_like(norms)
    gram_hat = gram_full / (scale[:, None] * scale[None, :])
    t0 = time.perf_counter()
    if active.any():
        idx = active.nonzero().flatten()
        alpha[idx] = min_norm_coefficients(gram_hat[idx][:, idx], method=method)
    if grads.device.type == "cuda":
        torch.cuda.synchronize(grads.device)
    solve = time.perf_counter() - t0
    weights = alpha / scale
    direction = (weights.to(grads.dtype)[:, None] * grads).sum(0)
    if rescale and normalize and active.any():
        direction = direction * norms[active].mean().to(grads.dtype)
    return Harmonized(direction=direction, alpha=alpha, grad_norms=norms, gram=gram_hat,
                      cosines=direction_cosines(grads, direction), solve_seconds=solve)


class Harmonizer:
    """MARBLE's coefficient state: runs :func:`harmonize` and keeps the EMA ``alpha_bar`` of the solutions.

    ``alpha_bar`` starts uniform (``1/K``), so amortised steps before the first solve weight rewards equally, and
    every solve, the first included, is blended into it (``rho * alpha_bar + (1 - rho) * alpha*``).

    ``grad_ema`` > 0 harmonises moving averages ``y_k <- grad_ema * y_k + (1 - grad_ema) * g_k`` of the
    per-reward gradients (started at the first gradients) instead of one batch's gradients, in the spirit of
    MoCo (Fernando et al., ICLR 2023: track each objective's gradient, build the direction from the tracked
    ones). The min-norm point of noisy gradients is a biased estimate of the min-norm point of the mean
    gradients; averaging reduces that bias (at the price of staleness: about ``(1 + grad_ema) / (1 - grad_ema)``
    solves are averaged). It matters when a reward's per-batch gradient is mostly sampling noise
    (``between_batch_cosines`` near 0); 0 is MARBLE as published. The applied direction is the rescaled
    min-norm point of the normalised averages, so it never opposes an averaged gradient
    (``Harmonized.tracked_cosines >= 0``); ``cosines`` and ``grad_norms`` stay those of this batch's gradients,
    comparable with the untracked modes, while ``gram`` is the averages'. The averages are state:
    :meth:`tracked_state` / :meth:`load_tracked_state` carry them through checkpoints.
    """

    def __init__(self, num_rewards: int, *, rho: float = 0.7, normalize: bool = True, rescale: bool = True,
                 method: str = "auto", grad_ema: float = 0.0) -> None:
        if num_rewards < 1:
            raise ValueError(f"num_rewards must be >= 1, got {num_rewards}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        if not 0.0 <= grad_ema < 1.0:
            raise ValueError(f"grad_ema must be in [0, 1) (0 = solve on each batch's gradients), got {grad_ema}")
        if method not in SOLVERS:
            raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
        self.num_rewards, self.rho, self.normalize, self.rescale, self.method = num_rewards, rho, normalize, \
            rescale, method
        self.grad_ema = grad_ema
        self.tracked: Optional[torch.Tensor] = None
        self.alpha_bar = torch.full((num_rewards,), 1.0 / num_rewards, dtype=torch.float64)
        self.num_solves = 0

    def step(self, grads: torch.Tensor) -> Harmonized:
        """Solve on ``grads`` ``[K, D]`` (or their moving averages) and fold the solution into ``alpha_bar``."""
        if grads.shape[0] != self.num_rewards:
            raise ValueError(f"expected {self.num_rewards} gradients, got {grads.shape[0]}")
        if self.grad_ema > 0:
            if self.tracked is None:
                self.tracked = grads.detach().clone()
            else:
                self.tracked.mul_(self.grad_ema).add_(grads.detach(), alpha=1.0 - self.grad_ema)
            tracked = harmonize(self.tracked, normalize=self.normalize, rescale=self.rescale, method=self.method)
            res = dataclasses.replace(tracked, cosines=direction_cosines(grads, tracked.direction),
                                      grad_norms=grads.to(tracked.grad_norms.dtype).norm(dim=1),
                                      tracked_cosines=tracked.cosines)
        else:
            res = harmonize(grads, normalize=self.normalize, rescale=self.rescale, method=self.method)
        # blended from the uniform start too (MARBLE §3.4: one batch must not zero a reward for a whole window)
        self.alpha_bar = ema_coefficients(self.alpha_bar, res.alpha.detach().cpu().double(), self.rho)
        self.num_solves += 1
        return res

    def state_dict(self) -> Dict:
        """JSON-safe coefficients and counters (the tracked gradients are tensors: :meth:`tracked_state`)."""
        return {"alpha_bar": [float(a) for a in self.alpha_bar], "num_solves": self.num_solves}

    def load_state_dict(self, state: Dict) -> None:
        if len(state["alpha_bar"]) != self.num_rewards:
            raise ValueError(f"the checkpoint's MARBLE coefficients are for {len(state['alpha_bar'])} rewards, this "
                             f"run has {self.num_rewards}: resume with the same rewards, or start afresh")
        self.alpha_bar = torch.tensor(state["alpha_bar"], dtype=torch.float64)
        self.num_solves = int(state["num_solves"])

    def tracked_state(self) -> Optional[torch.Tensor]:
        """The moving averages of the per-reward gradients ``[K, D]`` (``None`` before the first solve or when
        ``grad_ema`` is 0), for the checkpoint's tensor state."""
        return None if self.tracked is None else self.tracked.detach().cpu()

    def load_tracked_state(self, tracked: Optional[torch.Tensor], device=None,
                           num_params: Optional[int] = None) -> None:
        """Restore :meth:`tracked_state` (onto ``device``). Averages saved by a run with other rewards or other
        trained parameters (``num_params``) are an error; with ``grad_ema`` 0 they are dropped."""
        if tracked is None or self.grad_ema == 0:
            self.tracked = None
            return
        want = (self.num_rewards, num_params if num_params is not None else tracked.shape[1])
        if tuple(tracked.shape) != want:
            raise ValueError(f"checkpoint's tracked reward gradients have shape {tuple(tracked.shape)}, this run "
                             f"needs {want} (rewards x trained parameters); resume with the same rewards and "
                             "adapter, or start tracking afresh from a checkpoint without them")
        self.tracked = tracked.to(device if device is not None else tracked.device)


# ----------------------------------------------------------------------------------------- gradient buffers


class RewardGradients:
    """Per-loss gradient buffers ``[K, D]`` of ``params``, accumulated over micro-batches.

    MARBLE needs the gradient of each reward's loss separately (one backward each); these stay out of
    ``.grad`` so that ``.grad`` can hold what is applied unchanged (the KL term, kept outside the QP).
    Under DDP :meth:`all_reduce` averages all K buffers in one collective BEFORE the QP, so every rank
    solves the same problem and writes the same direction (MARBLE App. D).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], num_losses: int) -> None:
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        device = self.params[0].device
        self.buffer = torch.zeros(num_losses, sum(self.sizes), dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.buffer.zero_()

    def accumulate(self, losses: Sequence[torch.Tensor], *, retain_graph: bool = False, batched: bool = False) -> None:
        """Add ``d loss_k / d params`` to row k for each loss (the first ``len(losses)`` rows);
        ``retain_graph`` keeps the graph after the last one. ``batched`` runs the K backward passes as one
        vmapped backward (``is_grads_batched``): same result, fewer and larger kernels (GPUs)."""
        if len(losses) > self.buffer.shape[0]:
            raise ValueError(f"at most {self.buffer.shape[0]} losses, got {len(losses)}")
        if batched and len(losses) > 1:
            stacked = torch.stack(list(losses))
            eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
            grads = torch.autograd.grad(stacked, self.params, grad_outputs=eye, retain_graph=retain_graph,
                                        allow_unused=True, is_grads_batched=True)
            flat = torch.cat([(g if g is not None else torch.zeros(len(losses), *p.shape, device=p.device))
                              .reshape(len(losses), -1).float() for g, p in zip(grads, self.params)], dim=1)
            self.buffer[:len(losses)] += flat
            return
        for k, loss in enumerate(losses):
            keep = retain_graph or k < len(losses) - 1
            grads = torch.autograd.grad(loss, self.params, retain_graph=keep, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                              for g, p in zip(grads, self.params)])
            self.buffer[k] += flat

    def all_reduce(self, world_size: int, loss_scale: float = 1.0) -> None:
        """Average the buffers over ranks and divide them by ``loss_scale`` (the float16 loss scale the losses
        were multiplied by, :class:`trainers.common.LossScaler`)."""
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM)
        if world_size > 1 or loss_scale != 1.0:
            self.buffer /= world_size * loss_scale

    def harmonize_into_grad(self, harmonizer: "Harmonizer", world_size: int,
                            loss_scale: float = 1.0) -> Optional[Harmonized]:
        """The MARBLE step on the accumulated per-reward gradients (rows ``0..K-1``): all-reduce, solve, add the
        combined direction to ``.grad``, reset the buffers. Returns the :class:`Harmonized` record, or ``None``
        (buffers reset, ``.grad`` and the harmonizer's coefficient EMA and tracked gradients untouched) when a
        per-reward gradient is not finite: the caller skips the step
        (:func:`trainers.common.optimizer_update`)."""
        self.all_reduce(world_size, loss_scale)
        if not bool(torch.isfinite(self.buffer).all()):
            self.reset()
            return None
        res = harmonizer.step(self.buffer[:harmonizer.num_rewards])
        self.add_to_grad(res.direction)
        self.reset()
        return res

    def add_to_grad(self, direction: torch.Tensor) -> None:
        """``p.grad += direction`` (``[D]``, split and shaped like ``params``)."""
        offset = 0
        for p, n in zip(self.params, self.sizes):
            piece = direction[offset:offset + n].view_as(p).to(p.dtype)
            p.grad = piece.clone() if p.grad is None else p.grad + piece
            offset += n


def log_harmonized(res: Harmonized, names: List[str], prefix: str = "marble") -> Dict[str, float]:
    """Flat metrics of one harmonisation: coefficients, direction cosines, worst/min pairwise cosine."""
    out: Dict[str, float] = {}
    for i, n in enumerate(names):
        out[f"{prefix}/alpha/{n}"] = float(res.alpha[i])
        out[f"{prefix}/cos/{n}"] = float(res.cosines[i])
        out[f"{prefix}/grad_norm/{n}"] = float(res.grad_norms[i])
    out.update(cosine_summary(res.cosines, res.gram, prefix))
    if res.tracked_cosines is not None:  # the QP's own guarantee, against the averaged gradients (>= 0)
        out[f"{prefix}/worst_cos_tracked"] = float(res.tracked_cosines.min())
    out[f"{prefix}/qp_ms"] = 1e3 * res.solve_seconds
    return out


def cosine_summary(cosines: torch.Tensor, gram: torch.Tensor, prefix: str = "marble") -> Dict[str, float]:
    """``worst_cos`` (``min_k cos(d, g_k)``), ``worst_cos_negative`` (1.0 when it is below 0: its epoch mean is
    the fraction of such steps), ``mean_cos``, ``min_pairwise_cos``."""
    pc = pairwise_cosines(gram)
    k = pc.shape[0]
    off = [float(pc[i, j]) for i, j in itertools.combinations(range(k), 2)]
    worst = float(cosines.min())
    return {f"{prefix}/worst_cos": worst, f"{prefix}/worst_cos_negative": float(worst < 0),
            f"{prefix}/mean_cos": float(cosines.mean()), f"{prefix}/min_pairwise_cos": min(off) if off else 1.0}


def between_batch_cosines(grads: torch.Tensor) -> torch.Tensor:
    """``[K]``: each reward's mean cosine between its gradient estimates from ``B`` independent batches at the same
    weights (``grads`` ``[B, K, D]``, ``B >= 2``; mean over the ``B (B - 1) / 2`` pairs).

    With ``g = s + noise`` and independent noise, the expected cosine of two estimates is about
    ``|s|^2 / E|g|^2``: the share of a per-batch gradient that is signal. MARBLE's QP trusts ``cos(d, g_k)``
    measured on one batch; for a reward near 0 that cosine is mostly alignment with sampling noise
    (``scripts/marble_experiment.py --grad-noise``)."""
    if grads.ndim != 3 or grads.shape[0] < 2:
        raise ValueError(f"grads must be [B >= 2, K, D], got shape {tuple(grads.shape)}")
    g = grads.double()
    g = g / g.norm(dim=2, keepdim=True).clamp_min(1e-30)
    cos = torch.einsum("ikd,jkd->ijk", g, g)
    i, j = torch.triu_indices(g.shape[0], g.shape[0], offset=1)
    return cos[i, j].mean(dim=0)


def between_batch_cosines_se(grads: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos [K], se [K])``: :func:`between_batch_cosines` and its leave-one-batch-out jackknife standard error
    (``B >= 3``), from one ``B x B`` cosine matrix per reward.

    The ``B (B - 1) / 2`` pairs share batches, so the spread of the pair cosines understates the error of their
    mean when there is signal; the jackknife does not. Near ``cos = 0`` (no signal) the mean is a degenerate
    U-statistic and the jackknife is conservative, by about ``sqrt(2)``: a share called "not resolved"
    (within two standard errors of 0) may be resolvable by a sharper test, and bounds built from ``se`` are loose
    in the safe direction."""
    if grads.ndim != 3 or grads.shape[0] < 3:
        raise ValueError(f"grads must be [B >= 3, K, D] for a standard error, got shape {tuple(grads.shape)}")
    B = grads.shape[0]
    g = grads.double()
    g = g / g.norm(dim=2, keepdim=True).clamp_min(1e-30)
    C = torch.einsum("ikd,jkd->kij", g, g)  # [K, B, B]
    C = C - torch.diag_embed(torch.diagonal(C, dim1=1, dim2=2))
    total = C.sum(dim=(1, 2)) / 2  # [K]: the sum over pairs
    cos = total / (B * (B - 1) / 2)
    loo = (total[:, None] - C.sum(dim=2)) / ((B - 1) * (B - 2) / 2)  # [K, B]: mean without batch i
    se = ((B - 1) / B * ((loo - loo.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)).sqrt()
    return cos, se
