"""MARBLE's QP (diffalign.balance) against cvxpy, on random and ill-conditioned Gram matrices, K = 2..8."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffalign.balance import (
    Harmonizer,
    RewardGradients,
    direction_cosines,
    ema_coefficients,
    gram_matrix,
    harmonize,
    min_norm_coefficients,
    min_norm_cvxpy,
    min_norm_frank_wolfe,
    min_norm_projected_gradient,
    pairwise_cosines,
    project_simplex,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.norm(dim=-1, keepdim=True)


def random_grams(k: int, p: int, seed: int) -> torch.Tensor:
    """Correlated random unit gradients in 50 dims (what MARBLE's normalised gradients look like)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(p, k, 50, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(p, 1, 50, generator=gen,
                                                                                        dtype=torch.float64)
    g = _unit(g)
    return g @ g.transpose(-1, -2)


def ill_conditioned_grams(k: int, p: int, seed: int) -> torch.Tensor:
    """Nearly collinear gradients (spread over 4 orders of magnitude), one nearly opposite, in fewer dims than K:
    rank-deficient Grams with a min-norm objective of ~1e-6."""
    gen = torch.Generator().manual_seed(seed)
    d = 6
    base = torch.randn(p, 1, d, generator=gen, dtype=torch.float64)
    spread = torch.logspace(0, -4, k, dtype=torch.float64)[None, :, None]
    g = base + 1e-3 * torch.randn(p, k, d, generator=gen, dtype=torch.float64) * spread
    g[:, 0] = -g[:, 0] + 1e-2 * torch.randn(p, d, generator=gen, dtype=torch.float64)
    g = _unit(g)
    return g @ g.transpose(-1, -2)


def objective(gram, w):
    return torch.einsum("...i,...ij,...j->...", w, gram, w)


def assert_on_simplex(w):
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "ill_conditioned"])
@pytest.mark.parametrize("k", range(2, 9))
def test_fast_solver_matches_cvxpy_batched(kind, k):
    grams = (random_grams if kind == "random" else ill_conditioned_grams)(k, 6, seed=k)
    fast = min_norm_coefficients(grams)  # batched [P, K, K] -> [P, K]
    assert fast.shape == (6, k)
    assert_on_simplex(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpy's "may be inaccurate" on rank-deficient problems
        ref = min_norm_cvxpy(grams)
    f_fast, f_ref = objective(grams, fast), objective(grams, ref)
    rel = (f_fast - f_ref) / f_ref.abs()
    if kind == "random":
        assert float(rel.abs().max()) < 1e-6, (rel, f_ref)
    else:
        # on rank-deficient Grams CLARABEL itself is off by up to ~1e-5 (always ABOVE the optimum): the fast
        # solver must never be worse than cvxpy, and it must satisfy the optimality condition below
        assert float(rel.max()) < 1e-6, (rel, f_ref)
    # first-order optimality certificate on the simplex: (G w)_j >= w^T G w for every j
    gw = (grams @ fast[..., None])[..., 0]
    assert bool((gw.min(-1).values >= f_fast * (1 - 1e-6)).all())
    # unbatched calls give the same answer as the batched one
    torch.testing.assert_close(min_norm_coefficients(grams[2]), fast[2], rtol=0, atol=1e-12)


def test_k2_closed_form_known_answers():
    # orthogonal unit vectors: the midpoint; a dominated pair: the shorter vector
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(min_norm_coefficients(eye), torch.tensor([0.5, 0.5], dtype=torch.float64))
    g = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(min_norm_coefficients(g @ g.T), torch.tensor([0.0, 1.0], dtype=torch.float64))
    # identical vectors: any point is optimal; the solver returns a point on the simplex
    w = min_norm_coefficients(torch.ones(2, 2, dtype=torch.float64))
    assert_on_simplex(w)


@pytest.mark.parametrize("method", ["frank_wolfe", "projected_gradient"])
def test_iterative_solvers_on_well_conditioned_grams(method):
    grams = random_grams(5, 4, seed=1)
    fn = min_norm_frank_wolfe if method == "frank_wolfe" else min_norm_projected_gradient
    w = fn(grams, max_iter=5000)
    assert_on_simplex(w)
    f_exact = objective(grams, min_norm_coefficients(grams))
    assert float(((objective(grams, w) - f_exact) / f_exact).max()) < 1e-5


def test_project_simplex_against_cvxpy_free_cases():
    v = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, 0.0], [-1.0, 0.5, 0.6]], dtype=torch.float64)
    p = project_simplex(v)
    assert_on_simplex(p)
    torch.testing.assert_close(p[0], v[0])
    torch.testing.assert_close(p[1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p[2], torch.tensor([0.0, 0.45, 0.55], dtype=torch.float64))


def test_harmonize_min_norm_properties_and_rescale():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 300, generator=gen) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])
    res = harmonize(grads)
    assert_on_simplex(res.alpha)
    # the min-norm point d* of the unit gradients has <d*, ghat_k> >= ||d*||^2 for all k (MGDA's guarantee),
    # with equality on the support; hence no reward gets a negative cosine
    d_star = res.direction.double() / res.grad_norms.mean()
    ghat = grads.double() / res.grad_norms[:, None]
    dots = ghat @ d_star
    assert (dots >= d_star.norm() ** 2 - 1e-6).all()
    assert (res.cosines > 0).all()
    torch.testing.assert_close(res.cosines, direction_cosines(grads, res.direction))
    torch.testing.assert_close(pairwise_cosines(gram_matrix(grads)), res.gram, rtol=0, atol=1e-9)


def test_harmonize_leaves_out_zero_gradients():
    grads = torch.zeros(3, 10)
    grads[0, 0], grads[1, 1] = 1.0, 2.0
    res = harmonize(grads)
    assert float(res.alpha[2]) == 0.0
    torch.testing.assert_close(res.alpha[:2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # d* = (e0 + e1) / 2, rescaled by the mean norm of the two active gradients (1.5)
    torch.testing.assert_close(res.direction[:2], torch.tensor([0.75, 0.75]))


def test_without_normalisation_the_direction_is_the_raw_min_norm_point_whatever_rescale_says():
    """g1 = [3, 0], g2 = [0, 4]: the min-norm point of the raw gradients is alpha = (16/25, 9/25), d = [1.92, 1.44]
    (norm 2.4), already at the gradients' scale; rescaling it by their mean norm (3.5) gave norm 8.4, and a step that
    grows with |g|^2 (x 1e-3 gradients: 8.4e-6 instead of 2.4e-3). ``train.marble_normalize=false`` builds
    ``Harmonizer(normalize=False)`` with the default ``rescale=True``."""
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    for rescale in (True, False):
        res = harmonize(g, normalize=False, rescale=rescale)
        torch.testing.assert_close(res.alpha, torch.tensor([16 / 25, 9 / 25], dtype=res.alpha.dtype))
        torch.testing.assert_close(res.direction, torch.tensor([1.92, 1.44]))
        small = harmonize(g * 1e-3, normalize=False, rescale=rescale)
        torch.testing.assert_close(small.direction, torch.tensor([1.92e-3, 1.44e-3]))
    torch.testing.assert_close(Harmonizer(2, normalize=False).step(g).direction, torch.tensor([1.92, 1.44]))


def test_harmonizer_ema_and_state_dict():
    h = Harmonizer(2, rho=0.5, normalize=False)  # unit vectors in K = 2 always give (1/2, 1/2)
    torch.testing.assert_close(h.alpha_bar, torch.tensor([0.5, 0.5], dtype=torch.float64))
    g = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    h.step(g)  # alpha* = (0, 1), blended into the uniform start (one batch does not zero a reward)
    torch.testing.assert_close(h.alpha_bar, torch.tensor([0.25, 0.75], dtype=torch.float64))
    h.step(torch.eye(2))  # alpha* = (0.5, 0.5)
    torch.testing.assert_close(h.alpha_bar, torch.tensor([0.375, 0.625], dtype=torch.float64))
    h2 = Harmonizer(2, rho=0.5, normalize=False)
    h2.load_state_dict(h.state_dict())
    assert h2.state_dict() == h.state_dict()
    torch.testing.assert_close(ema_coefficients(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.7),
                               torch.tensor([0.7, 0.3]))


def test_reward_gradients_match_backward():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    out = lin(x)
    losses = [out[:, 0].pow(2).mean(), out[:, 1].mean()]
    rg = RewardGradients(list(lin.parameters()), 3)
    rg.accumulate(losses)
    for k, loss in enumerate([lin(x)[:, 0].pow(2).mean(), lin(x)[:, 1].mean()]):
        grads = torch.autograd.grad(loss, list(lin.parameters()))
        torch.testing.assert_close(rg.buffer[k], torch.cat([g.reshape(-1) for g in grads]))
    assert float(rg.buffer[2].abs().sum()) == 0.0
    batched = RewardGradients(list(lin.parameters()), 3)
    out = lin(x)
    batched.accumulate([out[:, 0].pow(2).mean(), out[:, 1].mean()], batched=True)
    torch.testing.assert_close(batched.buffer, rg.buffer)
    rg.add_to_grad(rg.buffer[0])
    torch.testing.assert_close(lin.weight.grad.reshape(-1), rg.buffer[0, :6])


def test_between_batch_cosines_known_answers():
    from diffalign.balance import between_batch_cosines

    e = torch.eye(4, dtype=torch.float64)
    # reward 0: the same direction in every batch (cos 1, any scale); reward 1: orthogonal batches (cos 0);
    # reward 2: batches along e0, -e0, e0 -> pairs (-1, +1, -1), mean -1/3
    grads = torch.stack([
        torch.stack([e[0] * 2.0, e[1], e[0]]),
        torch.stack([e[0] * 0.5, e[2], -e[0]]),
        torch.stack([e[0] * 3.0, e[3], e[0]]),
    ])  # [B = 3, K = 3, D = 4]
    torch.testing.assert_close(between_batch_cosines(grads), torch.tensor([1.0, 0.0, -1.0 / 3], dtype=torch.float64))
    # signal s plus independent noise of equal expected norm: the mean cosine estimates |s|^2 / E|g|^2 = 1/2
    gen = torch.Generator().manual_seed(0)
    d = 20000
    s = torch.randn(d, generator=gen)
    noisy = torch.stack([(s + torch.randn(d, generator=gen))[None] for _ in range(6)])
    assert abs(float(between_batch_cosines(noisy)[0]) - 0.5) < 0.02
    with pytest.raises(ValueError, match="B >= 2"):
        between_batch_cosines(grads[:1])


def test_between_batch_cosines_jackknife_error_by_hand():
    """Leave-one-batch-out: reward 2's batches e0, -e0, e0 give leave-one-out means -1, +1, -1 around -1/3, so
    se = sqrt(2/3 * (4/9 + 16/9 + 4/9)) = 4/3; a reward whose pairs all agree has se 0."""
    from diffalign.balance import between_batch_cosines, between_batch_cosines_se

    e = torch.eye(4, dtype=torch.float64)
    grads = torch.stack([torch.stack([e[0] * 2.0, e[1], e[0]]), torch.stack([e[0] * 0.5, e[2], -e[0]]),
                         torch.stack([e[0] * 3.0, e[3], e[0]])])
    cos, se = between_batch_cosines_se(grads)
    torch.testing.assert_close(cos, torch.tensor([1.0, 0.0, -1.0 / 3], dtype=torch.float64))
    torch.testing.assert_close(se, torch.tensor([0.0, 0.0, 4.0 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="B >= 3"):
        between_batch_cosines_se(grads[:2])
    # the one-matrix leave-one-out means equal recomputing the mean without each batch
    gen = torch.Generator().manual_seed(1)
    rand = torch.randn(7, 2, 50, generator=gen, dtype=torch.float64)
    cos, se = between_batch_cosines_se(rand)
    loo = torch.stack([between_batch_cosines(torch.cat([rand[:i], rand[i + 1:]])) for i in range(7)])
    torch.testing.assert_close(cos, between_batch_cosines(rand))
    torch.testing.assert_close(se, (6 / 7 * ((loo - loo.mean(dim=0)) ** 2).sum(dim=0)).sqrt())


def test_between_batch_cosines_jackknife_error_is_calibrated_with_signal():
    """With a signal share of 0.2 the jackknife error matches the spread of the estimate over repeated draws."""
    from diffalign.balance import between_batch_cosines_se

    gen = torch.Generator().manual_seed(0)
    D, B = 2000, 12
    s = torch.randn(D, generator=gen, dtype=torch.float64)
    s = s / s.norm() * 0.5                                                       # share 0.25 / 1.25 = 0.2
    draws = [between_batch_cosines_se((s + torch.randn(B, D, generator=gen, dtype=torch.float64) / D ** 0.5)[:, None])
             for _ in range(150)]
    cos = torch.stack([c for c, _ in draws])[:, 0]
    se = torch.stack([e for _, e in draws])[:, 0]
    assert abs(float(cos.mean()) - 0.2) < 0.01
    assert 0.8 < float(se.mean() / cos.std()) < 1.4


def test_harmonizer_grad_ema_solves_on_the_tracked_gradients():
    from diffalign.balance import Harmonizer, direction_cosines, harmonize, log_harmonized, min_norm_coefficients

    g1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 1.0]], dtype=torch.float64)
    g2 = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    h = Harmonizer(3, grad_ema=0.9)
    h.step(g1)
    torch.testing.assert_close(h.tracked, g1)  # started at the first gradients: no zero-start bias
    res = h.step(g2)
    y = 0.9 * g1 + 0.1 * g2
    torch.testing.assert_close(h.tracked, y)
    yn = y.norm(dim=1)
    alpha = min_norm_coefficients((y @ y.T) / (yn[:, None] * yn[None, :]))
    torch.testing.assert_close(res.alpha, alpha)
    # the direction is the rescaled min-norm point of the normalised averages (MoCo builds it from them too) ...
    torch.testing.assert_close(res.direction, ((alpha / yn)[:, None] * y).sum(0) * yn.mean())
    assert float(res.tracked_cosines.min()) >= -1e-9  # ... so it never opposes an averaged gradient
    # while the logged cosines and norms are this batch's, comparable with untracked MARBLE
    torch.testing.assert_close(res.grad_norms, g2.norm(dim=1))
    torch.testing.assert_close(res.cosines, direction_cosines(g2, res.direction))
    logged = log_harmonized(res, ["a", "b", "c"])
    assert logged["marble/worst_cos_tracked"] == float(res.tracked_cosines.min())
    assert logged["marble/worst_cos"] == float(res.cosines.min())
    # grad_ema = 0 is MARBLE as published: each batch on its own, nothing tracked
    plain = Harmonizer(3)
    plain.step(g1)
    last = plain.step(g2)
    torch.testing.assert_close(last.direction, harmonize(g2).direction)
    assert plain.tracked is None and plain.tracked_state() is None and last.tracked_cosines is None
    # checkpointed averages: restored onto the run's device; a shape that does not fit is an error
    fresh = Harmonizer(3, grad_ema=0.9)
    fresh.load_tracked_state(h.tracked_state(), "cpu", num_params=3)
    torch.testing.assert_close(fresh.tracked, h.tracked)
    with pytest.raises(ValueError, match="rewards x trained parameters"):
        Harmonizer(3, grad_ema=0.9).load_tracked_state(h.tracked_state(), num_params=4)
    plain.load_tracked_state(h.tracked_state())
    assert plain.tracked is None  # grad_ema 0 drops them
    with pytest.raises(ValueError, match="grad_ema"):
        Harmonizer(3, grad_ema=1.0)


def test_tracking_recovers_a_conflict_that_per_batch_noise_hides():
    """Reward 2's true gradient opposes reward 1's (cos -0.45) but each batch sees it under noise 5x its norm.
    On one batch its noisy gradient looks orthogonal to reward 1, so the mean direction the per-batch QP applies
    has a NEGATIVE cosine with reward 2's true gradient; with tracked gradients it is positive."""
    from diffalign.balance import Harmonizer

    d = 400
    s = torch.zeros(2, d, dtype=torch.float64)
    s[0, 0] = 1.0
    s[1, 0], s[1, 1] = -0.5, 1.0
    gen = torch.Generator().manual_seed(0)

    def mean_direction(grad_ema):
        h, total = Harmonizer(2, grad_ema=grad_ema), torch.zeros(d, dtype=torch.float64)
        for t in range(300):
            noise = torch.zeros(2, d, dtype=torch.float64)
            noise[1] = torch.randn(d, generator=gen, dtype=torch.float64) * (5 * float(s[1].norm()) / d**0.5)
            res = h.step(s + noise)
            if t >= 100:
                total += res.direction
        return total

    cos = torch.nn.functional.cosine_similarity
    assert float(cos(mean_direction(0.0), s[1], dim=0)) < -0.2  # -0.27 over seeds 0-3
    tracked = mean_direction(0.95)
    # seeds 0-3: 0.33-0.34 and 0.65-0.66
    assert float(cos(tracked, s[1], dim=0)) > 0.25 and float(cos(tracked, s[0], dim=0)) > 0.25


def test_min_pairwise_cos_is_the_minimum_over_three_rewards():
    """With two rewards there is one pair, so taking the max instead of the min passed every test."""
    from diffalign.balance import cosine_summary

    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    out = cosine_summary(torch.tensor([0.5, 0.2, -0.1], dtype=torch.float64), g @ g.T)  # pairwise cos 0, -1, 0
    assert out["marble/min_pairwise_cos"] == -1.0 and out["marble/worst_cos"] == -0.1
