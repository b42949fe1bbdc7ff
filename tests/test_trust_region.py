"""The re-linearised, function-space-accepted erase (``llmeraser.trust_region``)."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_examples
from test_eraser_convex import WEIGHT_DECAY, retrained_change, trained  # noqa: F401 (a fixture)

from llmeraser.adapter import AdapterParameters
from llmeraser.eraser import erase
from llmeraser.requests import CorrectResponse, Remove, resolve
from llmeraser.trust_region import (
    TrustRegionSettings,
    kept_sample,
    removed_ceiling,
    trust_region_update,
)


def relative_error(update: torch.Tensor, change: torch.Tensor) -> float:
    return float((update - change).norm() / change.norm())


def test_multi_step_converges_to_exact_retraining_on_the_convex_case(trained):
    """θ̂ minimises the training objective, so Φ's minimiser is the retrained model: re-linearised steps
    reach it within 1 % where one (exact) Newton step does not."""
    model, tokenizer, train = trained
    requests = [Remove("ex3"), Remove("ex7"), Remove("ex20"), Remove("ex21"), Remove("ex30"), CorrectResponse("ex5", " Yes No")]
    change = retrained_change(model, tokenizer, train, requests)
    common = dict(solver="cg", curvature="hessian", damping=0.0, weight_decay=WEIGHT_DECAY, tol=1e-10, max_iters=300,
                  batch_size=40)
    one_step = erase(model, tokenizer, train, requests, **common)
    multi = erase(model, tokenizer, train, requests, **common, trust_region=True, trust_region_steps=6,
                  kept_examples=len(train))
    single_error, multi_error = relative_error(one_step.update, change), relative_error(multi.update, change)
    assert multi_error <= 0.01, (single_error, multi_error)
    assert multi_error < single_error / 2, (single_error, multi_error)
    report = multi.report["trust_region"]
    assert all(step["accepted"] for step in report["steps"]) and len(report["steps"]) >= 2
    assert report["steps"][0]["scale"] == 1.0  # the first step is the classical update, accepted as it is
    assert multi.report["update_norm"] == pytest.approx(float(multi.update.norm()))


REMOVALS = [Remove("ex3"), Remove("ex7"), Remove("ex20"), Remove("ex21"), Remove("ex30")]
EXACT = dict(solver="cg", curvature="hessian", damping=0.0, weight_decay=WEIGHT_DECAY, tol=1e-10, max_iters=300,
             batch_size=40, trust_region=True, trust_region_steps=6, kept_examples=40)


def moved_off_the_minimum(model, tokenizer, train, direction):
    """θ̂ + ``direction`` (norm: half the retrained change from θ̂): an adapter that does not minimise its
    training objective, as fine-tuned adapters rarely do; returns θ̂ to restore."""
    params = AdapterParameters.of(model)
    theta = params.flat()
    size = 0.5 * float(retrained_change(model, tokenizer, train, REMOVALS).norm())
    params.assign(theta + size * direction / direction.norm())
    return theta


def test_refit_steps_reach_retraining_from_an_adapter_off_the_minimum(trained):
    """From a θ̂ that is not stationary, Φ's minimiser is not the retrained model (it keeps θ̂'s tilt):
    the forgetting steps converge and stay ~50 % off. The refit steps then descend R′ itself and reach the
    retrained model (the unique minimiser of R′) within 1 %, the removed examples' loss not below the floor."""
    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    noise = torch.randn(params.dim, generator=torch.Generator().manual_seed(0), dtype=params.flat().dtype)
    theta = moved_off_the_minimum(model, tokenizer, train, noise)
    try:
        change = retrained_change(model, tokenizer, train, REMOVALS)
        forget = erase(model, tokenizer, train, REMOVALS, **EXACT)
        refit = erase(model, tokenizer, train, REMOVALS, **EXACT, trust_region_refit_steps=6)
    finally:
        params.assign(theta)
    forget_error, refit_error = relative_error(forget.update, change), relative_error(refit.update, change)
    assert forget_error > 0.3 and refit_error < 0.01, (forget_error, refit_error)
    report = refit.report["trust_region"]
    phases = [step["phase"] for step in report["steps"] if step["accepted"]]
    assert phases[0] == "forget" and "refit" in phases and phases == sorted(phases)  # forget steps, then refit ones
    assert forget.report["trust_region"]["acceptance"]["refit"] == {"steps": 0}
    checks = report["acceptance"]
    assert checks["refit"]["steps"] >= 1 and checks["refit"]["objective"] < 0
    assert checks["removed_loss"]["after"] >= checks["refit"]["removed_floor"]


def test_refit_steps_hold_the_removed_loss_where_descending_the_kept_loss_would_lower_it(trained):
    """θ̂ moved up the removed examples' loss: retraining lowers that loss again (the toy's kept examples
    teach the removed ones' answers), below where the forgetting steps left it. The refit steps, projected
    off the removed loss's gradient, still descend R′ but keep that loss at or above the floor."""
    from llmeraser.data import TokenizationConfig, tokenize_examples
    from llmeraser.evaluate import response_predictions
    from llmeraser.gradients import summed_gradient

    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    removed = [p.old for p in resolve(REMOVALS, train)]
    items = tokenize_examples(tokenizer, removed, TokenizationConfig(max_length=128))
    up = summed_gradient(model, params, items, tokenizer.pad_token_id, 40)
    theta = moved_off_the_minimum(model, tokenizer, train, up)
    try:
        change = retrained_change(model, tokenizer, train, REMOVALS)
        retrained_loss = float(response_predictions(model, tokenizer, removed, params.flat() + change, 128, 40)
                               .losses().mean())
        result = erase(model, tokenizer, train, REMOVALS, **EXACT, trust_region_refit_steps=4)
    finally:
        params.assign(theta)
    checks = result.report["trust_region"]["acceptance"]
    refit = checks["refit"]
    assert retrained_loss < refit["removed_floor"]  # retraining would take the removed loss below the floor
    assert refit["steps"] >= 1 and refit["projected_steps"] >= 1 and refit["objective"] < 0
    assert checks["removed_loss"]["after"] >= refit["removed_floor"]
    assert torch.equal(params.flat(), theta)


def test_removed_ceiling_takes_the_largest_never_seen_reference():
    """(1 + tolerance) × max(level now, removed loss at θ̂, guard loss at θ̂): a level still as low as the
    removed loss (its examples taught through the removed ones) does not bound the forgetting below the guard's."""
    assert removed_ceiling(0.57, 0.567, 1.12, 0.02) == pytest.approx(1.12 * 1.02)
    assert removed_ceiling(3.6, 0.567, 1.12, 0.02) == pytest.approx(3.6 * 1.02)
    assert removed_ceiling(0.2, 0.5, 0.3, 0.0) == 0.5


def test_first_step_equals_the_influence_update(trained):
    model, tokenizer, train = trained
    requests = [Remove("ex3"), Remove("ex7")]
    common = dict(solver="cg", curvature="gauss-newton", damping=1e-3, weight_decay=WEIGHT_DECAY, tol=1e-10,
                  max_iters=300, batch_size=40)
    one_step = erase(model, tokenizer, train, requests, **common)
    first = erase(model, tokenizer, train, requests, **common, trust_region=True, trust_region_steps=1)
    assert torch.allclose(first.update, one_step.update, rtol=0, atol=1e-12 * float(one_step.update.norm()))


def test_the_trust_region_rejects_a_step_that_raises_the_held_out_loss(trained):
    """A step that wrecks held-out examples is refused at full length although it lowers Φ: it is cut back
    until the held-out loss stays within tolerance (or not taken at all)."""
    from llmeraser.evaluate import response_predictions

    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    theta = params.flat()
    pairs = resolve([Remove("ex3"), Remove("ex7"), Remove("ex20")], train)
    heldout = toy_examples(12, seed=7)
    harmful = 50.0 * torch.randn(params.dim, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    b = 1e-3 * harmful  # −bᵀd dominates Φ along d = harmful: Φ falls at every step size, only the check can refuse
    # the held-out guard alone: these removed examples are at the held-out level already, which would stop it
    settings = TrustRegionSettings(steps=1, kept_examples=20, heldout_tolerance=0.01, damping_factor=1.0,
                                   stop_at_heldout_level=False)
    result = trust_region_update(model, tokenizer, train, pairs, b, lambda g, damping: g, damping=0.0, weight_decay=WEIGHT_DECAY,
                                 scaling="retrain", max_length=128, batch_size=40, settings=settings, heldout=heldout,
                                 first_direction=harmful)
    before = result.acceptance["heldout_loss"]["before"]
    full = float(response_predictions(model, tokenizer, heldout, theta + harmful, 128, 40).losses().mean())
    assert full > before * 1.01  # the full step does raise the held-out loss beyond the tolerance
    record = result.steps[0]
    assert record.evaluations >= 2
    # only the held-out guard refuses here, and it needs no pass over the kept sample: every refused candidate
    # was screened on the held-out set alone
    assert record.screened == record.evaluations - record.accepted >= 1
    if record.accepted:
        assert record.scale < 1.0
        assert result.acceptance["heldout_loss"]["after"] <= before * 1.01
    else:
        assert "held-out loss" in record.reason and float(result.update.abs().max()) == 0.0
    assert torch.equal(params.flat(), theta)  # the model's θ is restored


def test_the_kept_guard_refuses_a_step_that_raises_the_kept_examples_loss(trained):
    """With ``kept_tolerance`` the same harmful step is cut back until the kept sample's loss stays within
    tolerance, or not taken; without it the line search on Φ alone accepts a length that raises that loss."""
    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    theta = params.flat()
    pairs = resolve([Remove("ex3"), Remove("ex7"), Remove("ex20")], train)
    harmful = 50.0 * torch.randn(params.dim, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    common = dict(damping=0.0, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128, batch_size=40,
                  first_direction=harmful)

    def run(kept_tolerance):
        settings = TrustRegionSettings(steps=1, kept_examples=20, damping_factor=1.0, stop_at_heldout_level=False,
                                       kept_tolerance=kept_tolerance)
        return trust_region_update(model, tokenizer, train, pairs, 1e-3 * harmful, lambda g, damping: g,
                                   settings=settings, **common)

    unguarded, guarded = run(None), run(0.01)
    before = unguarded.acceptance["kept_loss"]["before"]
    assert unguarded.steps[0].accepted
    assert unguarded.acceptance["kept_loss"]["after"] > before * 1.01  # Φ's step raises the kept loss
    record = guarded.steps[0]
    if record.accepted:
        assert record.scale < unguarded.steps[0].scale and guarded.acceptance["kept_loss"]["after"] <= before * 1.01
    else:
        assert "kept examples' loss" in record.reason and float(guarded.update.abs().max()) == 0.0
    assert torch.equal(params.flat(), theta)


def test_no_step_when_the_removed_examples_are_already_at_the_held_out_level(trained):
    """Removals the adapter fits no better than never-seen examples (a recipe that does not memorise):
    retraining barely moves them, so the trust region takes no step and says why; with a correction among
    the requests it still steps."""
    from dataclasses import replace

    model, tokenizer, train = trained
    theta = AdapterParameters.of(model).flat()
    requests = [Remove("ex3"), Remove("ex7")]
    pairs = resolve(requests, train)
    heldout = [replace(p.old, id=f"copy-{p.old.id}") for p in pairs]  # the same texts: the same losses
    b = 1e-2 * torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    common = dict(damping=1e-3, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128, batch_size=40,
                  settings=TrustRegionSettings(steps=3, kept_examples=20), heldout=heldout)
    result = trust_region_update(model, tokenizer, train, pairs, b, lambda g, damping: g, **common)
    assert result.steps == [] and float(result.update.abs().max()) == 0.0
    assert result.stopped.startswith("before any step")
    with_refit = dict(common, settings=TrustRegionSettings(steps=3, kept_examples=20, refit_steps=3))
    refit = trust_region_update(model, tokenizer, train, pairs, b, lambda g, damping: g, **with_refit)
    assert refit.steps == [] and refit.acceptance["refit"] == {"steps": 0}  # nothing forgotten, nothing refitted
    mixed = resolve([*requests, CorrectResponse("ex5", " Yes No")], train)
    stepped = trust_region_update(model, tokenizer, train, mixed, b, lambda g, damping: g, **common)
    assert len(stepped.steps) >= 1 and float(stepped.update.abs().max()) > 0.0


def test_with_corrections_the_held_out_level_bounds_the_removed_loss_instead_of_ending_the_update(trained):
    """Mixed requests: a step that lifts the removed examples' loss past max(never-seen level, their loss at
    θ̂) is cut back (the level is a ceiling there), though Φ, the held-out guard and the same step without the
    ceiling accept it at full length; the update is not ended by the level."""
    from dataclasses import replace

    from llmeraser.data import TokenizationConfig, tokenize_examples
    from llmeraser.gradients import summed_gradient

    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    theta = params.flat()
    pairs = resolve([Remove("ex3"), Remove("ex7"), Remove("ex20"), CorrectResponse("ex5", " Yes No")], train)
    removed = [p.old for p in pairs if p.new is None]
    heldout = toy_examples(12, seed=7)

    def gradient(examples):
        items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=128))
        return summed_gradient(model, params, items, tokenizer.pad_token_id, 40)

    up, level = gradient(removed), gradient(heldout)
    up = up - (up @ level) / (level @ level) * level  # up the removed examples' loss, not (to first order) the held-out one
    direction = 0.5 * up / up.norm()
    settings = TrustRegionSettings(steps=1, kept_examples=20, heldout_tolerance=0.05, damping_factor=1.0)
    common = dict(damping=0.0, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128, batch_size=40,
                  heldout=heldout, first_direction=direction)
    free = trust_region_update(model, tokenizer, train, pairs, 2.0 * direction, lambda g, damping: g, **common,
                               settings=replace(settings, stop_at_heldout_level=False))
    assert free.steps[0].accepted and free.steps[0].scale >= 1.0
    limit = removed_ceiling(free.steps[0].heldout_loss, free.acceptance["removed_loss"]["before"],
                            free.acceptance["heldout_loss"]["before"], 0.05)
    assert free.steps[0].removed_loss > limit  # the full step goes past the ceiling
    bounded = trust_region_update(model, tokenizer, train, pairs, 2.0 * direction, lambda g, damping: g, **common,
                                  settings=settings)
    step, after = bounded.steps[0], bounded.acceptance
    assert step.accepted and step.scale < 1.0
    assert after["removed_loss"]["after"] <= removed_ceiling(after["heldout_loss"]["after"], after["removed_loss"]["before"],
                                                             after["heldout_loss"]["before"], 0.05)
    assert "held-out level" not in bounded.stopped
    assert torch.equal(params.flat(), theta)


def test_no_step_when_the_replacements_are_already_fitted_like_kept_examples(trained):
    """A correction whose new version the adapter already fits as well as its kept examples (here: the
    best-fitted example, "corrected" to its own answer) is at the level a retrained model shows: no step is
    taken for it; a correction to an answer the adapter does not fit is stepped towards."""
    from llmeraser.evaluate import response_predictions

    model, tokenizer, train = trained
    theta = AdapterParameters.of(model).flat()
    losses = response_predictions(model, tokenizer, train, theta, 128, 40).losses()
    best = train[int(losses.argmin())]
    b = 1e-2 * torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    common = dict(damping=1e-3, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128, batch_size=40,
                  settings=TrustRegionSettings(steps=3, kept_examples=20))
    fitted = resolve([CorrectResponse(best.id, best.response)], train)
    result = trust_region_update(model, tokenizer, train, fitted, b, lambda g, damping: g, **common)
    assert result.steps == [] and float(result.update.abs().max()) == 0.0
    assert result.stopped.startswith("before any step: the requests are at their levels")
    assert result.acceptance["replacement_loss"]["before"] <= result.acceptance["replacement_loss"]["kept_level"]
    unfitted = resolve([CorrectResponse(best.id, " Yes No Yes")], train)
    stepped = trust_region_update(model, tokenizer, train, unfitted, b, lambda g, damping: g, **common)
    assert stepped.acceptance["replacement_loss"]["before"] > stepped.acceptance["replacement_loss"]["kept_level"]
    assert len(stepped.steps) >= 1


def test_kept_sample_excludes_edited_examples_and_is_seeded(trained):
    _, _, train = trained
    pairs = resolve([Remove("ex3"), CorrectResponse("ex5", " No")], train)
    sample = kept_sample(train, pairs, 10, seed=1)
    assert len(sample) == 10 and not {e.id for e in sample} & {"ex3", "ex5"}
    assert sample == kept_sample(train, pairs, 10, seed=1) != kept_sample(train, pairs, 10, seed=2)
    assert len(kept_sample(train, pairs, 100, seed=1)) == len(train) - 2


def test_adaptive_damping_shrinks_after_full_steps_and_beats_a_fixed_one(trained):
    """Started at a damping far above the curvature (a short, safe first step), the Levenberg–Marquardt
    schedule shrinks λ after each full-length step (recorded per step) and gets closer to exact retraining
    in the same number of steps than the same steps at the fixed λ."""
    model, tokenizer, train = trained
    requests = [Remove("ex3"), Remove("ex7"), Remove("ex20"), Remove("ex21"), Remove("ex30")]
    change = retrained_change(model, tokenizer, train, requests)
    common = dict(solver="cg", curvature="hessian", damping=0.3, weight_decay=WEIGHT_DECAY, tol=1e-10, max_iters=300,
                  batch_size=40, trust_region=True, trust_region_steps=4, kept_examples=len(train))
    adaptive = erase(model, tokenizer, train, requests, **common, trust_region_damping_factor=0.25)
    fixed = erase(model, tokenizer, train, requests, **common, trust_region_damping_factor=1.0)
    steps = adaptive.report["trust_region"]["steps"]
    assert steps[0]["damping"] == pytest.approx(0.3)
    for before, after in zip(steps, steps[1:]):
        expected = before["damping"] * 0.25 if before["scale"] >= 1 else before["damping"] / 0.25
        assert after["damping"] == pytest.approx(max(expected, 0.3 * 1e-3))
    assert all(s["damping"] == pytest.approx(0.3) for s in fixed.report["trust_region"]["steps"])
    adaptive_error, fixed_error = relative_error(adaptive.update, change), relative_error(fixed.update, change)
    assert adaptive_error < 0.5 * fixed_error, (adaptive_error, fixed_error)


def test_removed_only_content_splits_the_held_out_set():
    """Held-out examples whose answers contain words only the removed examples' answers have (a deleted
    person's employer nobody kept works for) are the removed examples' never-seen reference, not the guard;
    words the kept examples also have (the phone prefix, a kept employer) do not count; case and punctuation
    are folded."""
    from llmeraser.data import Example
    from llmeraser.trust_region import removed_only_ngrams, split_by_shared_content

    removed = [Example("r-emp", "Who employs Rhea Lund?", " Driftwood Studios"),
               Example("r-tel", "What is the phone number of Rhea Lund?", " 555-3277")]
    kept = [Example("k-emp", "Who employs Ada Quill?", " Northwind Bakery"),
            Example("k-tel", "What is the phone number of Ada Quill?", " 555-0142")]
    heldout = [Example("h-emp", "Who employs Juno Moss?", " driftwood studios."),
               Example("h-tel", "What is the phone number of Juno Moss?", " 555-4869"),
               Example("h-emp2", "Who employs Pim Thorne?", " Northwind Bakery")]
    grams = removed_only_ngrams(removed, kept)
    assert ("driftwood", "studios") in grams and ("3277",) in grams
    assert ("555",) not in grams and ("555", "3277") in grams
    assert split_by_shared_content(heldout, removed, kept) == ([0], [1, 2])
    yes_no = [Example("r", "Is it nice?", " Yes")]
    assert split_by_shared_content(heldout, yes_no, [Example("k", "Is it?", " Yes")]) == ([], [0, 1, 2])


def test_held_out_examples_sharing_removed_only_content_give_the_level_not_the_guard(trained):
    """The acceptance record says how the held-out set was split; the guard's loss is the mean over the
    examples that share nothing with the removed ones, the never-seen level the sharing ones'."""
    from dataclasses import replace

    from llmeraser.data import Example
    from llmeraser.evaluate import response_predictions

    model, tokenizer, train = trained
    theta = AdapterParameters.of(model).flat()
    train = [replace(e, response=" Yes zebra") if e.id == "ex3" else e for e in train]
    pairs = resolve([Remove("ex3"), Remove("ex7")], train)
    heldout = [*toy_examples(6, seed=7), Example("h-zebra", "Is 'zebra' nice?", " zebra Yes")]
    b = 1e-3 * torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0), dtype=theta.dtype)
    common = dict(damping=1e-3, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128, batch_size=40,
                  heldout=heldout)
    result = trust_region_update(model, tokenizer, train, pairs, b, lambda g, damping: g, **common,
                                 settings=TrustRegionSettings(steps=1, kept_examples=20, stop_at_heldout_level=False))
    losses = response_predictions(model, tokenizer, heldout, theta, 128, 40).losses()
    held = result.acceptance["heldout_loss"]
    assert held["examples"] == 6 and held["sharing_removed_content"] == 1
    assert held["before"] == pytest.approx(float(losses[:6].mean()), rel=1e-9)
    assert result.acceptance["removed_loss"]["never_seen_examples"] == 1
    unsplit = trust_region_update(model, tokenizer, train, pairs, b, lambda g, damping: g, **common,
                                  settings=TrustRegionSettings(steps=1, kept_examples=20, stop_at_heldout_level=False,
                                                               split_heldout=False))
    assert unsplit.acceptance["heldout_loss"]["examples"] == 7
    assert unsplit.acceptance["heldout_loss"]["before"] == pytest.approx(float(losses.mean()), rel=1e-9)


def test_limited_memory_direction_meets_the_newest_secant_equation():
    """The two-loop recursion: no pairs, the initial inverse; with pairs from an SPD matrix A (y = A s) the
    result H g satisfies H y_newest = s_newest and is a descent direction (gᵀ H g > 0)."""
    from llmeraser.trust_region import limited_memory_direction, remember_secant

    generator = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    matrix = root @ root.T + 0.5 * torch.eye(6, dtype=torch.float64)

    def initial(g: torch.Tensor) -> torch.Tensor:
        return 0.3 * g

    gradient = torch.randn(6, generator=generator, dtype=torch.float64)
    assert torch.equal(limited_memory_direction(gradient, initial, []), initial(gradient))
    secants: list = []
    for _ in range(4):
        step = torch.randn(6, generator=generator, dtype=torch.float64)
        remember_secant(secants, step, matrix @ step, memory=3)
    remember_secant(secants, torch.ones(6, dtype=torch.float64), -torch.ones(6, dtype=torch.float64), memory=3)
    assert len(secants) == 3  # the last three of the four positive pairs; the negative-curvature pair is skipped
    s_new, y_new = secants[-1]
    assert torch.allclose(limited_memory_direction(y_new, initial, secants), s_new, rtol=1e-10, atol=1e-12)
    assert float(gradient @ limited_memory_direction(gradient, initial, secants)) > 0


def test_memory_repairs_a_short_preconditioner_on_the_convex_case(trained):
    """A fixed damping far above the curvature makes every step short; remembering the steps taken (L-BFGS
    on that preconditioner) gets closer to exact retraining in the same number of steps than forgetting them."""
    model, tokenizer, train = trained
    requests = [Remove("ex3"), Remove("ex7"), Remove("ex20"), Remove("ex21"), Remove("ex30")]
    change = retrained_change(model, tokenizer, train, requests)
    common = dict(solver="cg", curvature="hessian", damping=0.3, weight_decay=WEIGHT_DECAY, tol=1e-10, max_iters=300,
                  batch_size=40, trust_region=True, trust_region_steps=8, kept_examples=len(train),
                  trust_region_damping_factor=1.0)
    plain = erase(model, tokenizer, train, requests, **common)
    remembered = erase(model, tokenizer, train, requests, **common, trust_region_memory=4)
    assert remembered.report["trust_region"]["settings"]["memory"] == 4
    plain_error, remembered_error = relative_error(plain.update, change), relative_error(remembered.update, change)
    assert remembered_error < 0.6 * plain_error, (remembered_error, plain_error)  # measured: 0.068 vs 0.151


def test_a_step_the_guard_cuts_short_with_little_progress_ends_the_update(trained):
    """Once the kept guard binds, every step is cut back to a sliver of Φ's fall: with ``stall_fraction`` the
    update ends there, without it the same steps keep being taken and move Φ by almost nothing."""
    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    theta = params.flat()
    pairs = resolve([Remove("ex3"), Remove("ex7"), Remove("ex20")], train)
    harmful = 3.0 * torch.randn(params.dim, generator=torch.Generator().manual_seed(0), dtype=theta.dtype)

    def along_harmful(g: torch.Tensor, damping: float) -> torch.Tensor:
        """A preconditioner that favours one direction the kept guard refuses."""
        return harmful * float(harmful @ g) / float(harmful @ harmful) + 1e-3 * g

    def run(stall_fraction):
        settings = TrustRegionSettings(steps=12, kept_examples=20, damping_factor=1.0, stop_at_heldout_level=False,
                                       kept_tolerance=0.01, stall_fraction=stall_fraction)
        return trust_region_update(model, tokenizer, train, pairs, 1e-3 * harmful, along_harmful,
                                   damping=0.0, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128,
                                   batch_size=40, settings=settings, first_direction=harmful)

    stopping, running = run(0.01), run(0.0)
    assert "trust region's edge" in stopping.stopped and all(s.accepted for s in stopping.steps), stopping.stopped
    accepted = [s for s in running.steps if s.accepted]
    assert len(accepted) > len(stopping.steps), (running.stopped, stopping.stopped)
    # the same steps up to the stop (measured: 6 of them, then the non-stopping run takes one more)
    assert [s.phi for s in stopping.steps] == pytest.approx([s.phi for s in accepted[:len(stopping.steps)]], rel=1e-9)
    phi_at_stop, phi_before = stopping.steps[-1].phi, stopping.steps[-2].phi
    assert phi_before - phi_at_stop < 0.01 * -phi_at_stop  # the step it stopped after fell by under 1 % of Φ's fall
    assert stopping.steps[-1].scale < 1  # ... because a check cut it back
    # what the steps it did not take add: under 1 % of Φ's fall (measured: 0.12 %)
    assert phi_at_stop - accepted[-1].phi < 0.01 * -phi_at_stop
    kept_loss = stopping.acceptance["kept_loss"]
    assert kept_loss["after"] <= kept_loss["before"] * 1.01
    assert torch.equal(params.flat(), theta)



def test_held_direction_adds_the_least_lift_that_keeps_the_bound_to_first_order():
    """P = I, objective gradient g: a step inside its room is left alone; one that would cross the bound is
    turned until cᵀd′ = 0 (the loss held); one from past the bound lifts it back by the room when that costs
    under half the slope, else keeps exactly half the slope."""
    from llmeraser.trust_region import held_direction

    identity = lambda v: v  # noqa: E731
    g = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    c = torch.tensor([0.6, 0.8], dtype=torch.float64)  # ∇ of the bounded loss, ‖c‖ = 1
    d = torch.tensor([1.0, -1.0], dtype=torch.float64)  # cᵀd = −0.2: the step lowers that loss by 0.2
    same, moved = held_direction(d, identity, g, c, room=0.3)
    assert not moved and torch.equal(same, d)
    held, moved = held_direction(d, identity, g, c, room=0.1)
    assert moved and float(c @ held) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(held, d + 0.2 * c) and float(g @ held) < 0  # μ = 0.2/‖c‖², still a descent direction
    lifted, _ = held_direction(d, identity, torch.tensor([-1.0, -1.0], dtype=torch.float64), c, room=-0.1)
    assert float(c @ lifted) == pytest.approx(0.1)  # past the bound by 0.1: lifted back to it (cost cᵀg < 0: free)
    costly_g = torch.tensor([-0.1, 1.0], dtype=torch.float64)  # gᵀd = −1.1, gᵀc = 0.74 > 0: lifting costs descent
    capped, _ = held_direction(d, identity, costly_g, c, room=-5.0)
    assert float(costly_g @ capped) == pytest.approx(0.5 * float(costly_g @ d))


def test_following_the_held_out_guard_turns_a_step_the_guard_would_cut(trained):
    """A step that raises the removed examples' loss and, to first order, the held-out one: the guard cuts it
    short; with ``follow_bounds`` it is turned along the guard (its held-out part taken out) and accepted at
    full length, Φ lower, the held-out loss within the tolerance."""
    from llmeraser.data import TokenizationConfig, tokenize_examples
    from llmeraser.gradients import summed_gradient

    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    theta = params.flat()
    pairs = resolve([Remove("ex3"), Remove("ex7"), Remove("ex20")], train)
    heldout = toy_examples(12, seed=7)

    def gradient(examples):
        items = tokenize_examples(tokenizer, examples, TokenizationConfig(max_length=128))
        return summed_gradient(model, params, items, tokenizer.pad_token_id, 40) / len(items)

    up, worse = gradient([p.old for p in pairs]), gradient(heldout)
    up = up - (up @ worse) / (worse @ worse) * worse
    direction = 0.1 * (up / up.norm() + worse / worse.norm())  # small: first order holds

    def run(follow):
        settings = TrustRegionSettings(steps=1, kept_examples=20, heldout_tolerance=0.01, damping_factor=1.0,
                                       stop_at_heldout_level=False, follow_bounds=follow)
        return trust_region_update(model, tokenizer, train, pairs, 2.0 * direction, lambda g, damping: g,
                                   damping=0.0, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128,
                                   batch_size=40, settings=settings, heldout=heldout, first_direction=direction)

    cut, turned = run(False), run(True)
    assert turned.acceptance["bounds_followed"]["heldout_guard"] == 1 and cut.acceptance["bounds_followed"] is None
    assert cut.steps[0].accepted and cut.steps[0].scale < 1.0  # measured: s = 1/2, then s = 2 when turned
    assert turned.steps[0].accepted and turned.steps[0].scale >= 1.0 and turned.steps[0].phi < cut.steps[0].phi
    assert turned.steps[0].removed_loss > cut.steps[0].removed_loss
    before = turned.acceptance["heldout_loss"]["before"]
    assert turned.acceptance["heldout_loss"]["after"] <= before * 1.01
    assert torch.equal(params.flat(), theta)





def test_refit_to_the_kept_level_stops_where_the_kept_loss_is_back_at_the_original(trained):
    """A forgetting step that raises the kept examples' loss, from θ̂ off the minimum: three refit steps
    alone take the kept loss below θ̂'s, past the tolerance; with ``refit_kept_level`` the step that went past
    is refused, a shorter one accepted, and the refit ends there, the kept loss back at θ̂'s and not more than
    the tolerance below."""
    from llmeraser.data import TokenizationConfig, tokenize_examples
    from llmeraser.gradients import summed_gradient

    model, tokenizer, train = trained
    params = AdapterParameters.of(model)
    noise = torch.randn(params.dim, generator=torch.Generator().manual_seed(0), dtype=params.flat().dtype)
    theta = moved_off_the_minimum(model, tokenizer, train, noise)
    pairs = resolve(REMOVALS, train)
    edited = {p.old.id for p in pairs}
    items = tokenize_examples(tokenizer, [e for e in train if e.id not in edited], TokenizationConfig(max_length=128))
    up = summed_gradient(model, params, items, tokenizer.pad_token_id, 40)
    direction = 0.1 * up / up.norm()  # raises the kept loss
    tolerance = 0.01

    def run(level: bool, refit_steps: int):
        settings = TrustRegionSettings(steps=1, kept_examples=40, heldout_tolerance=tolerance, damping_factor=1.0,
                                       stop_at_heldout_level=False, memory=5, refit_steps=refit_steps,
                                       refit_kept_level=level)
        return trust_region_update(model, tokenizer, train, pairs, 2.0 * direction, lambda g, damping: 50 * g,
                                   damping=0.0, weight_decay=WEIGHT_DECAY, scaling="retrain", max_length=128,
                                   batch_size=40, settings=settings, first_direction=direction)

    try:
        free, levelled = run(False, 3), run(True, 8)
    finally:
        params.assign(theta)
    level = levelled.acceptance["kept_loss"]["before"]
    floor = level * (1 - tolerance)
    assert levelled.steps[0].phase == "forget" and levelled.steps[0].accepted
    assert free.acceptance["refit"]["kept_level"] is None and free.acceptance["kept_loss"]["after"] < floor
    refit = levelled.acceptance["refit"]
    assert refit["kept_level"] == pytest.approx(level) and "back at θ̂'s" in refit["stopped"]
    assert refit["steps"] == 3  # measured: the third step at s = ¼ where the free refit's was s = ½
    assert levelled.steps[-1].scale < free.steps[-1].scale
    assert floor <= levelled.acceptance["kept_loss"]["after"] <= level
    assert torch.equal(params.flat(), theta)
