"""Persona-space report: PCA, held-out AUROC, layer choice, role ranking, report files."""

from __future__ import annotations

import itertools

import pytest
import torch

from persona_compass.errors import PersonaCompassError
from persona_compass.persona_space.report import (
    DEFAULT_LABEL,
    ReportError,
    RolloutSamples,
    aligned_pc1,
    auroc,
    axis_in_span,
    choose_capping_window,
    choose_monitor_layer,
    default_window_width,
    heldout_auroc,
    pc1_cosine,
    pc1_ends,
    pc_cosines,
    pca,
    rank_roles,
    standardised_separation,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signal strength along the known direction per layer: none below layer 2, strongest at 5-6.
STRENGTH = (0.0, 0.0, 1.0, 1.5, 2.0, 3.0, 3.0, 2.0)
ROLE_SCALES = (0.5, 0.7, 0.9, 1.1, 1.3, 1.5)


def _direction(d_model: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d_model, generator=gen, dtype=torch.float64)
    return u / u.norm()


def _synthetic(
    n_questions: int = 40, d_model: int = 16, default_per_q: int = 3, seed: int = 0
) -> tuple[RolloutSamples, torch.Tensor]:
    """Default and roles differ along ``u`` in layers >= 2 only; layers 0-1 are pure noise."""
    gen = torch.Generator().manual_seed(seed)
    u = _direction(d_model)
    strength = torch.tensor(STRENGTH, dtype=torch.float64)
    acts, labels, qids = [], [], []
    for q in range(n_questions):
        for _ in range(default_per_q):
            acts.append(strength[:, None] * u)
            labels.append(DEFAULT_LABEL)
            qids.append(q)
        for r, scale in enumerate(ROLE_SCALES):
            acts.append(-scale * strength[:, None] * u)
            labels.append(f"role{r}")
            qids.append(q)
    base = torch.stack(acts)
    noise = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    return RolloutSamples((base + noise).float(), tuple(labels), tuple(qids)), u


# --------------------------------------------------------------------------- samples


def test_rollout_samples_validation():
    acts = torch.zeros(3, 2, 4)
    samples = RolloutSamples(acts, ["default", "a", "b"], [0, 0, 1])  # type: ignore[arg-type]
    assert samples.labels == ("default", "a", "b") and samples.question_ids == (0, 0, 1)
    assert (samples.n_rollouts, samples.n_layers, samples.d_model) == (3, 2, 4)
    assert samples.roles == ("a", "b")
    with pytest.raises(ReportError, match="shape"):
        RolloutSamples(torch.zeros(3, 4), ("a",) * 3, (0,) * 3)
    with pytest.raises(ReportError, match="labels"):
        RolloutSamples(acts, ("a", "b"), (0, 0, 1))
    with pytest.raises(ReportError, match="question ids"):
        RolloutSamples(acts, ("a", "b", "c"), (0, 1))
    with pytest.raises(ReportError, match="non-empty string"):
        RolloutSamples(acts, ("a", "", "c"), (0, 0, 1))
    with pytest.raises(ReportError, match="must be an int"):
        RolloutSamples(acts, ("a", "b", "c"), (0, 0.5, 1))  # type: ignore[arg-type]
    bad = acts.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ReportError, match="NaN"):
        RolloutSamples(bad, ("a", "b", "c"), (0, 0, 1))
    with pytest.raises(ReportError, match="floating"):
        RolloutSamples(torch.zeros(3, 2, 4, dtype=torch.long), ("a", "b", "c"), (0, 0, 1))
    assert issubclass(ReportError, PersonaCompassError)


# --------------------------------------------------------------------------- PCA


def test_pca_finds_the_main_direction():
    gen = torch.Generator().manual_seed(3)
    n_roles, n_layers, d_model = 12, 3, 10
    u = _direction(d_model, seed=4)
    centre = torch.randn(n_layers, d_model, generator=gen, dtype=torch.float64) * 5
    coeff = torch.randn(n_roles, 1, 1, generator=gen, dtype=torch.float64) * 5
    small = torch.randn(n_roles, n_layers, d_model, generator=gen, dtype=torch.float64) * 0.1
    roles = centre + coeff * u + small
    ratio, comps = pca(roles, k=4)
    assert ratio.shape == (n_layers, 4) and comps.shape == (n_layers, 4, d_model)
    assert ratio.dtype == torch.float64
    assert bool((ratio[:, 0] > 0.95).all())
    assert bool((ratio[:, :-1] >= ratio[:, 1:] - 1e-12).all())
    assert bool((ratio.sum(dim=1) <= 1 + 1e-9).all())
    for layer in range(n_layers):
        assert abs(float(comps[layer, 0] @ u)) > 0.99
        gram = comps[layer] @ comps[layer].T
        assert torch.allclose(gram, torch.eye(4, dtype=torch.float64), atol=1e-9)
    axis = u.expand(n_layers, d_model) * 3.0
    cos = pc1_cosine(axis, comps)
    assert cos.shape == (n_layers,) and bool((cos > 0.99).all())
    assert torch.allclose(pc1_cosine(-axis, comps), cos)  # sign of the axis does not matter
    flipped = comps.clone()
    flipped[:, 0] *= -1
    assert torch.allclose(pc1_cosine(axis, flipped), cos)  # nor the sign of the PC
    aligned = aligned_pc1(axis, flipped)
    assert bool(((aligned * axis).sum(-1) > 0).all())
    assert bool(((aligned_pc1(-axis, comps) * -axis).sum(-1) > 0).all())
    # An axis orthogonal to u is nearly orthogonal to PC1.
    other = torch.randn(d_model, generator=gen, dtype=torch.float64)
    other = other - (other @ u) * u
    assert bool((pc1_cosine(other.expand(n_layers, d_model), comps) < 0.1).all())


def test_axis_on_the_second_pc_is_found_and_lies_in_the_span():
    """The persona-space layout seen on SmolLM2: the largest spread is not the axis."""
    gen = torch.Generator().manual_seed(7)
    n_roles, n_layers, d_model = 40, 2, 12
    style = _direction(d_model, seed=8)
    assistant = _direction(d_model, seed=9)
    assistant = assistant - (assistant @ style) * style
    assistant = assistant / assistant.norm()
    # Centred, uncorrelated coordinates, so the PCs are exactly style and assistant.
    a = torch.randn(n_roles, generator=gen, dtype=torch.float64)
    b = torch.randn(n_roles, generator=gen, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    b = b - (b @ a) / (a @ a) * a
    a, b = (5 * a / a.norm())[:, None, None], (2 * b / b.norm())[:, None, None]
    roles = (a * style + b * assistant).expand(n_roles, n_layers, d_model)
    _, comps = pca(roles, k=4)
    axis = (assistant * 0.8 + style * 0.6).expand(n_layers, d_model)  # |cos| 0.8 and 0.6
    cos = pc_cosines(axis, comps)
    assert cos.shape == (n_layers, 4)
    assert torch.allclose(cos[:, 0], torch.full((n_layers,), 0.6, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(cos[:, 1], torch.full((n_layers,), 0.8, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(pc1_cosine(axis, comps), cos[:, 0])
    assert torch.allclose(axis_in_span(cos, 2), torch.ones(n_layers, dtype=torch.float64))
    assert torch.allclose(axis_in_span(cos, 1), cos[:, 0])
    # An axis outside the roles' plane has a short shadow in it.
    off = torch.zeros(d_model, dtype=torch.float64)
    off[0] = 1.0
    off = off - (off @ style) * style - (off @ assistant) * assistant
    assert bool((axis_in_span(pc_cosines(off.expand(n_layers, d_model), comps), 2) < 1e-9).all())
    names = [f"r{i:02d}" for i in range(n_roles)]
    pc1 = aligned_pc1(axis, comps)[0]
    low, high = pc1_ends(names, roles[:, 0], pc1, n=3)
    order = sorted(range(n_roles), key=lambda i: float(a[i]))
    assert low == [names[i] for i in order[:3]]  # the axis leans to +style, so +a is high
    assert high == [names[i] for i in order[::-1][:3]]
    with pytest.raises(ReportError, match="role names"):
        pc1_ends(names[:-1], roles[:, 0], pc1)


def test_pca_fewer_roles_than_k_pads_with_zeros():
    roles = torch.randn(4, 2, 6)
    ratio, comps = pca(roles, k=10)
    assert ratio.shape == (2, 10) and comps.shape == (2, 10, 6)
    # 4 centred vectors span at most 3 directions.
    assert torch.allclose(ratio[:, :3].sum(dim=1), torch.ones(2, dtype=torch.float64))
    assert bool((ratio[:, 3:] == 0).all()) and bool((comps[:, 4:] == 0).all())
    assert torch.allclose(comps[:, 3], torch.zeros(2, 6, dtype=torch.float64))


def test_pca_identical_roles_and_errors():
    same = torch.ones(3, 2, 5)
    ratio, comps = pca(same, k=2)
    assert bool((ratio == 0).all()) and bool((comps == 0).all())
    assert bool((pc1_cosine(torch.ones(2, 5), comps) == 0).all())  # zero PC -> 0, not NaN
    with pytest.raises(ReportError, match="at least 2"):
        pca(torch.randn(1, 2, 5))
    with pytest.raises(ReportError, match="k must"):
        pca(torch.randn(3, 2, 5), k=0)
    with pytest.raises(ReportError, match="n_roles, n_layers, d_model"):
        pca(torch.randn(3, 5))
    with pytest.raises(ReportError, match="do not match"):
        pc1_cosine(torch.randn(3, 5), torch.randn(2, 2, 5))


# --------------------------------------------------------------------------- AUROC


def _brute_auroc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 5, (7, 3), generator=gen).double()
    neg = torch.randint(0, 4, (9, 3), generator=gen).double()
    got = auroc(pos, neg)
    for col in range(3):
        want = _brute_auroc(pos[:, col].tolist(), neg[:, col].tolist())
        assert float(got[col]) == pytest.approx(want, abs=1e-12)


def test_auroc_known_values():
    assert float(auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))[0]) == 1.0
    assert float(auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))[0]) == 0.0
    assert float(auroc(torch.ones(4), torch.ones(3))[0]) == 0.5
    with pytest.raises(ReportError, match="at least one"):
        auroc(torch.ones(0), torch.ones(3))


def test_standardised_separation():
    pos = torch.tensor([1.0, 2.0, 3.0])
    neg = torch.tensor([-1.0, 0.0, 1.0])
    assert float(standardised_separation(pos, neg)[0]) == pytest.approx(2.0)  # gap 2, std 1
    assert float(standardised_separation(neg, pos)[0]) == pytest.approx(-2.0)
    assert float(standardised_separation(torch.ones(3), torch.ones(2))[0]) == 0.0


# --------------------------------------------------------------------------- held out


def test_heldout_auroc_high_where_signal_chance_where_noise():
    samples, _ = _synthetic()
    result = heldout_auroc(samples, test_fraction=0.3, seed=0)
    a, s = result["auroc"], result["separation"]
    assert a.shape == (8,) and s.shape == (8,)
    assert bool((a[4:] > 0.99).all()) and bool((a[2:] > 0.8).all())
    assert bool(((a[:2] - 0.5).abs() < 0.2).all())
    assert bool((s[:2].abs() < 0.6).all()) and bool((s[5:7] > 4.0).all())
    assert result["n_test_default"] == 3 * len(result["test_questions"])
    assert result["n_test_role"] == 6 * len(result["test_questions"])
    assert result["n_train"] == 9 * len(result["train_questions"])
    assert result["n_train_roles"] == 6
    assert len(result["test_questions"]) == 12  # round(0.3 * 40)
    assert result["axis"].shape == (8, 16)

    monitor = choose_monitor_layer(a, s)
    assert monitor in (5, 6)
    window = choose_capping_window(s, width=2, min_start_frac=0.0)
    assert window == (5, 7)
    start, stop = choose_capping_window(s)
    assert stop - start == default_window_width(8) == 2 and start >= 4
    assert bool((s[start:stop] > 2.0).all())


def test_question_split_is_disjoint_and_deterministic():
    samples, _ = _synthetic(n_questions=20)
    first = heldout_auroc(samples, seed=7)
    again = heldout_auroc(samples, seed=7)
    assert first["test_questions"] == again["test_questions"]
    assert torch.equal(first["auroc"], again["auroc"])
    train, test = set(first["train_questions"]), set(first["test_questions"])
    assert not train & test and train | test == set(range(20))
    splits = {tuple(heldout_auroc(samples, seed=s)["test_questions"]) for s in range(6)}
    assert len(splits) > 1
    # Rollouts follow their question: counts match the ids on each side.
    test_rollouts = sum(1 for q in samples.question_ids if q in test)
    assert first["n_test_default"] + first["n_test_role"] == test_rollouts
    assert first["n_train"] == samples.n_rollouts - test_rollouts


def test_heldout_auroc_errors():
    samples, _ = _synthetic(n_questions=6)
    with pytest.raises(ReportError, match="test_fraction"):
        heldout_auroc(samples, test_fraction=1.0)
    only_roles = RolloutSamples(torch.randn(6, 2, 3), ("a", "b") * 3, (0, 0, 1, 1, 2, 2))
    with pytest.raises(ReportError, match="no 'default' rollouts.*more questions"):
        heldout_auroc(only_roles)
    one_question = RolloutSamples(torch.randn(2, 2, 3), ("default", "a"), (0, 0))
    with pytest.raises(ReportError, match="at least 2 distinct questions"):
        heldout_auroc(one_question)
    # Default rollouts only on question 0: one side of any split lacks them.
    labels = ("default", "a", "a", "a", "a", "a")
    lopsided = RolloutSamples(torch.randn(6, 2, 3), labels, (0, 0, 1, 1, 2, 2))
    with pytest.raises(ReportError, match="no 'default' rollouts"):
        heldout_auroc(lopsided)
    no_roles = RolloutSamples(torch.randn(4, 2, 3), ("default",) * 4, (0, 1, 2, 3))
    with pytest.raises(ReportError, match="no role rollouts"):
        heldout_auroc(no_roles)


# --------------------------------------------------------------------------- layer choice


def test_choose_monitor_layer_rules():
    auroc_ = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.95, 0.7, 0.6, 0.5])
    sep = torch.tensor([9.0, 1.0, 2.0, 3.0, 8.0, 0.5, 0.4, 0.1])
    assert choose_monitor_layer(auroc_, sep) == 3  # layer 0 is too shallow; 2 vs 3 by sep
    assert choose_monitor_layer(auroc_, sep, min_depth=0.0) == 0
    assert choose_monitor_layer(auroc_, sep, min_depth=0.5) == 4
    assert choose_monitor_layer([0.5, float("nan"), 0.6, 0.6], [0, 0, 1, 1], min_depth=0.0) == 2
    with pytest.raises(ReportError, match="min_depth"):
        choose_monitor_layer(auroc_, sep, min_depth=1.0)
    with pytest.raises(ReportError, match="layers"):
        choose_monitor_layer(auroc_, sep[:3])


def test_choose_capping_window_rules():
    sep = torch.tensor([5.0, 5.0, 0.0, 0.0, 1.0, 3.0, 3.0, 4.0, 4.0, 1.0, 2.0, 2.0])
    assert choose_capping_window(sep, width=2) == (7, 9)  # layers 0-5 are below the start
    assert choose_capping_window(sep, width=2, min_start_frac=0.0) == (0, 2)
    assert choose_capping_window(sep, width=3) == (6, 9)
    assert choose_capping_window(sep) == (6, 9)  # default width 3 for 12 layers
    assert choose_capping_window(sep, width=12) == (0, 12)
    assert choose_capping_window(sep, width=4, min_start_frac=0.95) == (8, 12)
    flat = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert choose_capping_window(flat, width=2) == (4, 6)  # ties go to the earlier window
    nan = float("nan")
    assert choose_capping_window([0.0, 0, 0, 0, nan, nan, 0.5, 0.5], width=2) == (6, 8)
    assert choose_capping_window([1.0]) == (0, 1)
    with pytest.raises(ReportError, match="width"):
        choose_capping_window(sep, width=13)
    with pytest.raises(ReportError, match="min_start_frac"):
        choose_capping_window(sep, min_start_frac=-0.1)


def test_layer_choice_only_uses_allowed_layers():
    """extract --layers: the monitor layer and the capping window come from recorded layers."""
    nan = float("nan")
    auroc_ = torch.tensor([nan, 0.9, 0.8, nan, 1.0, 0.7, nan, nan])
    sep = torch.tensor([nan, 2.0, 1.0, nan, 5.0, 3.0, nan, nan])
    assert choose_monitor_layer(auroc_, sep, layers=[1, 2, 4, 5]) == 4
    assert choose_monitor_layer(auroc_, sep, layers=[1, 2, 5]) == 2  # >= depth 2 only
    # none past min_depth: the best of the allowed ones anyway
    assert choose_monitor_layer(auroc_, sep, layers=[1], min_depth=0.5) == 1
    with pytest.raises(ReportError, match="layer indices"):
        choose_monitor_layer(auroc_, sep, layers=[8])
    with pytest.raises(ReportError, match="empty"):
        choose_monitor_layer(auroc_, sep, layers=[])

    sep12 = torch.tensor([5.0, 5.0, 0.0, 0.0, 1.0, 3.0, 3.0, 4.0, 4.0, 1.0, 2.0, 2.0])
    # all allowed: the same answers as without the argument
    for width in (1, 2, 3, 12):
        assert choose_capping_window(sep12, width=width, layers=range(12)) == (
            choose_capping_window(sep12, width=width)
        )
    # the window never covers a layer outside the allowed ones: 7-8 are the best pair, but 8
    # is not allowed; 9-11 is the only run of 3 past the start
    allowed = [0, 1, 2, 6, 7, 9, 10, 11]
    assert choose_capping_window(sep12, width=2, layers=allowed) == (6, 8)
    assert choose_capping_window(sep12, width=3, layers=allowed) == (9, 12)
    # default width (3 for 12 layers) is shortened to the longest allowed run
    assert choose_capping_window(sep12, layers=[0, 1, 6, 7]) == (6, 8)
    # nothing allowed past the start: the last window that fits
    assert choose_capping_window(sep12, layers=[0, 1, 2, 3]) == (1, 4)
    with pytest.raises(ReportError, match="no 3 consecutive layers"):
        choose_capping_window(sep12, width=3, layers=[0, 1, 5, 6])


# --------------------------------------------------------------------------- roles


def test_rank_roles_order_and_values():
    axis = torch.zeros(3, 4)
    axis[1, 0] = 2.0  # unit axis is e0 at layer 1
    roles = torch.zeros(4, 3, 4)
    roles[:, 1, 0] = torch.tensor([3.0, -1.0, 2.0, 2.0])
    roles[:, 1, 1] = 7.0  # off-axis component must not count
    ranked = rank_roles(["pirate", "demon", "teacher", "nurse"], roles, axis, 1)
    assert [name for name, _ in ranked] == ["pirate", "nurse", "teacher", "demon"]
    assert [value for _, value in ranked] == pytest.approx([3.0, 2.0, 2.0, -1.0])
    with pytest.raises(ReportError, match="layer"):
        rank_roles(["a", "b", "c", "d"], roles, axis, 3)
    with pytest.raises(ReportError, match="role names"):
        rank_roles(["a"], roles, axis, 1)
    with pytest.raises(ReportError, match="zero"):
        rank_roles(["a", "b", "c", "d"], roles, axis, 0)
    with pytest.raises(ReportError, match="shape"):
        rank_roles(["a", "b", "c", "d"], roles, axis[:, :2], 1)


# --------------------------------------------------------------------------- report


def _report_inputs(n_roles: int):
    samples, u = _synthetic(n_questions=20)
    held = heldout_auroc(samples)
    gen = torch.Generator().manual_seed(5)
    scales = torch.linspace(-2, 2, n_roles, dtype=torch.float64)
    strength = torch.tensor(STRENGTH, dtype=torch.float64)
    role_vectors = scales[:, None, None] * strength[None, :, None] * u + 0.1 * torch.randn(
        n_roles, 8, 16, generator=gen, dtype=torch.float64
    )
    names = [f"role_{i:03d}" for i in range(n_roles)]
    ratio, comps = pca(role_vectors, k=5)
    cos = pc1_cosine(held["axis"], comps)
    monitor = choose_monitor_layer(held["auroc"], held["separation"])
    window = choose_capping_window(held["separation"])
    ranking = rank_roles(names, role_vectors, held["axis"], monitor)
    return {
        "model_id": "tiny/test-model",
        "summary": {"roles": n_roles, "questions": 20, "test fraction": 0.3},
        "variance_ratio": ratio,
        "pc1_cos": cos,
        "auroc": held["auroc"],
        "separation": held["separation"],
        "ranking": ranking,
        "monitor_layer": monitor,
        "capping_window": window,
    }


@pytest.mark.parametrize("n_roles", [12, 75])
def test_write_report_files(tmp_path, n_roles):
    kwargs = _report_inputs(n_roles)
    out = tmp_path / "report"
    path = write_report(out, extra_lines=["synthetic data"], **kwargs)
    assert path == out / "report.md"
    text = path.read_text(encoding="utf-8")
    assert "tiny/test-model" in text and "synthetic data" in text
    assert f"Monitor layer: {kwargs['monitor_layer']}" in text
    start, stop = kwargs["capping_window"]
    assert f"[{start}, {stop})" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert len(table_rows) == 8
    top_name, top_value = kwargs["ranking"][0]
    bottom_name = kwargs["ranking"][-1][0]
    assert top_name in text and bottom_name in text and f"{top_value:.4g}" in text
    if n_roles > 20:
        assert "Least Assistant-like" in text
        assert kwargs["ranking"][n_roles // 2][0] not in text  # the middle is left out
    for name in ("auroc.png", "variance.png", "roles.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_write_report_persona_space_section(tmp_path):
    kwargs = _report_inputs(12)
    names = [name for name, _ in kwargs["ranking"]]
    cos = torch.zeros(8, 5, dtype=torch.float64)
    cos[:, 0], cos[:, 1] = 0.3, 0.9
    text = write_report(
        tmp_path, pc_cos=cos, pc1_roles=(names[-2:], names[:2]), **kwargs
    ).read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert all("| PC2 (0.900) | 0.949 |" in row for row in table)
    header = text.split("## Per layer")[1].splitlines()[2:4]
    assert header[0].count("|") == header[1].count("|") == 9  # separator matches the columns
    section = text.split("## Persona space")[1].split("## Roles")[0]
    assert f"{names[-2]}, {names[-1]} (away from the Assistant)" in section
    assert "PC1 0.300, PC2 0.900" in section and "length 0.949" in section
    with pytest.raises(ReportError, match="pc_cos"):
        write_report(tmp_path, pc_cos=cos[:5], **kwargs)
    plain = write_report(tmp_path / "plain", **kwargs).read_text()
    assert "## Persona space" not in plain and "best-aligned" not in plain


def test_write_report_errors(tmp_path):
    kwargs = _report_inputs(6)
    with pytest.raises(ReportError, match="monitor_layer"):
        write_report(tmp_path, **{**kwargs, "monitor_layer": 8})
    with pytest.raises(ReportError, match="capping_window"):
        write_report(tmp_path, **{**kwargs, "capping_window": (6, 9)})
    with pytest.raises(ReportError, match="layer count"):
        write_report(tmp_path, **{**kwargs, "pc1_cos": kwargs["pc1_cos"][:5]})
    with pytest.raises(ReportError, match="ranking is empty"):
        write_report(tmp_path, **{**kwargs, "ranking": []})
    assert not (tmp_path / "report.md").exists()


def test_write_report_with_recorded_layers(tmp_path):
    """Unrecorded layers are NaN in the inputs and left out of the per-layer table."""
    kwargs = _report_inputs(6)
    recorded = [2, 3, 4, 5, 6]
    nan_at = torch.tensor([i not in recorded for i in range(8)])
    for key in ("auroc", "separation", "pc1_cos"):
        kwargs[key] = kwargs[key].masked_fill(nan_at, float("nan"))
    kwargs["variance_ratio"] = kwargs["variance_ratio"].masked_fill(nan_at[:, None], float("nan"))
    kwargs["monitor_layer"] = choose_monitor_layer(
        kwargs["auroc"], kwargs["separation"], layers=recorded
    )
    kwargs["capping_window"] = choose_capping_window(kwargs["separation"], layers=recorded)
    text = write_report(tmp_path, recorded_layers=recorded, **kwargs).read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert [int(row.split("|")[1]) for row in table_rows] == recorded
    assert "recorded 5 (2-6); the axis is zero on the others" in text
    assert "nan" not in text.split("## Per layer")[1].split("## Roles")[0].lower()
    with pytest.raises(ReportError, match="recorded layers only"):
        write_report(tmp_path / "x", recorded_layers=[0, 1], **kwargs)
