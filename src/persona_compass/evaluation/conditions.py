"""Evaluation conditions: how the model is run in one arm of a comparison.

A condition says whether the compass caps (never, always, or adaptively after an alert),
which capping config it uses (the bundle's own ``capping.json``, or a floor calibrated on a
layer window at a percentile of the bundle's calibration, as the research swept), and
whether it steers along the axis. Conditions are written as short specs and joined with
commas on the command line::

    unsteered,capped,adaptive,steer:-4,steer:-4@15,cap:22:29@p25,capped+steer:-4

Grammar (:data:`GRAMMAR`)::

    CONDITION := [LABEL "="] PART ("+" PART)*
    PART      := "unsteered"                    nothing changes the model (the baseline)
               | "capped"                       the bundle's capping.json, on every answer
               | "adaptive"                     the bundle's capping.json, engaged after an
                                                alert and released on recovery
               | "cap:" WINDOW [AT] ["/" RULE]  a floor on WINDOW calibrated by RULE on the
                                                bundle's calibration, always on
               | "adaptive:" WINDOW [AT] ["/" RULE]  the same floor, adaptive
               | "steer:" COEF ["@" LAYERS] ["/" SCALE]
                                                add COEF x the axis on LAYERS (default: the
                                                monitor layer); SCALE raw (default), unit or
                                                relative; COEF < 0 pushes away from the Assistant
    WINDOW, LAYERS := L | START:STOP            one block, or a half-open range of blocks
    AT        := "@p" PCT                       the PCT-th percentile (default 25)
               | "@keep" KEEP                   keep KEEP % of default-answer tokens untouched
                                                (default 99; implies RULE token-default)
    RULE      := response-mean | token-roleplay | token-default   (default response-mean;
                                                see persona_compass.capping.RULES)

So ``cap:16:24@p25`` is the research's floor (the 25th percentile of role-play response
means), ``cap:16:24@p25/token-roleplay`` the 25th percentile of role-play tokens, and
``cap:16:24@keep99`` the highest floor that leaves 99 % of default-answer tokens untouched.

At most one capping part and one steering part; ``unsteered`` stands alone. A condition's
``name`` is its label when one is given, else its canonical spec (``steer:-4.0`` is named
``steer:-4``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..axis import Axis
from ..capping import DEFAULT_KEEP, DEFAULT_PERCENTILE, DEFAULT_RULE, RULES, CappingConfig
from ..compass import Steering
from ..errors import PersonaCompassError
from ..layers import normalize_layers

GRAMMAR = """\
conditions are comma-separated; each is [LABEL=]PART[+PART] with PART one of:
  unsteered                   no capping, no steering (the baseline)
  capped                      the bundle's capping.json on every answer
  adaptive                    the bundle's capping.json, engaged after an alert
  cap:WINDOW[@pPCT][/RULE]    a floor on layers WINDOW at the PCT-th calibration percentile
                              (default 25), e.g. cap:22:29@p25 (half-open range) or cap:24;
                              RULE response-mean (default: role-play response means) or
                              token-roleplay (role-play tokens): cap:22:29@p25/token-roleplay
  cap:WINDOW@keepKEEP         the token-default rule: the highest floor that leaves KEEP % of
                              default-answer tokens untouched, e.g. cap:22:29@keep99
  adaptive:WINDOW[...]        the same floors, adaptive
  steer:COEF[@LAYERS][/SCALE] steer COEF x axis on LAYERS (default: the monitor layer),
                              SCALE raw|unit|relative: steer:-4, steer:-4@15, steer:0.2/unit
  at most one capping part and one steering part, e.g. capped+steer:-4; LABEL is [A-Za-z0-9_.-]+"""

DEFAULT_CONDITIONS = ("unsteered", "capped")
BASELINE = "unsteered"

_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")
_WINDOW = r"(\d+)(?::(\d+))?"
_CAP = re.compile(
    rf"^(cap|adaptive):{_WINDOW}(?:@(p|keep)?([0-9]*\.?[0-9]+))?(?:/([a-z][a-z-]*))?$"
)
_STEER = re.compile(
    r"^steer:([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)(?:@(\d+)(?::(\d+))?)?(?:/(raw|unit|relative))?$"
)


class ConditionError(PersonaCompassError):
    """A condition spec that cannot be read, or one the bundle cannot serve."""


def _fail(spec: str, problem: str) -> ConditionError:
    return ConditionError(f"condition {spec!r}: {problem}\n{GRAMMAR}")


def _num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Condition:
    """One arm of the evaluation.

    Attributes:
        name: the label used in file names, tables and charts.
        spec: the canonical spec (see the module docstring).
        mode: the compass' cap mode: ``off``, ``on`` or ``adaptive``.
        cap_source: ``None`` (no capping), ``"bundle"`` (the bundle's capping.json) or
            ``"calibrate"`` (a floor on ``cap_layers`` calibrated by ``cap_rule``).
        cap_layers: the half-open window ``(start, stop)`` for ``"calibrate"``.
        cap_percentile: the calibration percentile for ``"calibrate"`` (None for the
            ``token-default`` rule).
        steering: the steering to add, or None.
        cap_rule: the calibration rule for ``"calibrate"`` (:data:`~persona_compass.capping.RULES`).
        cap_keep: the share of default-answer tokens kept untouched (``token-default``).
    """

    name: str
    spec: str
    mode: str = "off"
    cap_source: str | None = None
    cap_layers: tuple[int, int] | None = None
    cap_percentile: float | None = None
    steering: Steering | None = None
    cap_rule: str | None = None
    cap_keep: float | None = None

    @property
    def is_baseline(self) -> bool:
        """Nothing changes the model (no capping, no steering)."""
        return self.mode == "off" and self.steering is None

    @property
    def modifies_single_turn(self) -> bool:
        """Whether a single fresh answer differs from the baseline's.

        Adaptive capping starts disengaged and engages only after an alert on an earlier
        answer, so on a one-turn prompt an adaptive condition without steering *is* the
        baseline.
        """
        return self.mode == "on" or self.steering is not None

    @property
    def n_cap_layers(self) -> int | None:
        """Layers in a calibrated window (None for the bundle's config or no capping)."""
        if self.cap_layers is None:
            return None
        return self.cap_layers[1] - self.cap_layers[0]

    def describe(self) -> str:
        """One line in words, for reports."""
        parts = []
        if self.cap_source == "bundle":
            what = "the bundle's capping config"
            parts.append(f"{what}, adaptive" if self.mode == "adaptive" else f"{what}, always on")
        elif self.cap_source == "calibrate":
            assert self.cap_layers is not None
            lo, hi = self.cap_layers
            floor = f"a floor on layers {lo}..{hi - 1} "
            if self.cap_rule == "token-default":
                assert self.cap_keep is not None
                floor += f"leaving {_num(self.cap_keep)}% of default-answer tokens untouched"
            else:
                assert self.cap_percentile is not None
                floor += f"at calibration p{_num(self.cap_percentile)}"
                if self.cap_rule == "token-roleplay":
                    floor += " of role-play tokens"
            parts.append(f"{floor}, adaptive" if self.mode == "adaptive" else f"{floor}, always on")
        if self.steering is not None:
            where = (
                "the monitor layer"
                if self.steering.layers is None
                else "layers " + ",".join(map(str, self.steering.layers))
            )
            parts.append(
                f"steering {_num(self.steering.coefficient)} x axis ({self.steering.scale}) "
                f"on {where}"
            )
        return "; ".join(parts) if parts else "no capping, no steering (baseline)"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (also the transcript's ``steering_config``)."""
        steer = None
        if self.steering is not None:
            steer = {
                "coefficient": self.steering.coefficient,
                "layers": None if self.steering.layers is None else list(self.steering.layers),
                "scale": self.steering.scale,
            }
        return {
            "name": self.name,
            "spec": self.spec,
            "mode": self.mode,
            "cap_source": self.cap_source,
            "cap_layers": None if self.cap_layers is None else list(self.cap_layers),
            "cap_percentile": self.cap_percentile,
            "steering": steer,
            "description": self.describe(),
            # only for the token rules: a response-mean condition's dict (and the key of its
            # stored runs) stays what it was before rules existed
            **(
                {"cap_rule": self.cap_rule, "cap_keep": self.cap_keep}
                if self.cap_rule not in (None, DEFAULT_RULE)
                else {}
            ),
        }


def _window(spec: str, lo_s: str, hi_s: str | None) -> tuple[int, int]:
    lo = int(lo_s)
    hi = int(hi_s) if hi_s is not None else lo + 1
    if hi <= lo:
        raise _fail(spec, f"the layer range {lo}:{hi} is empty; write START:STOP with START < STOP")
    return lo, hi


def _window_text(window: tuple[int, int]) -> str:
    lo, hi = window
    return str(lo) if hi == lo + 1 else f"{lo}:{hi}"


def parse_condition(text: str) -> Condition:
    """Read one condition spec (see :data:`GRAMMAR`).

    Raises:
        ConditionError: the spec does not follow the grammar (the message lists it).
    """
    if not isinstance(text, str) or not text.strip():
        raise _fail(str(text), "is empty")
    raw = text.strip()
    label: str | None = None
    body = raw
    if "=" in raw:
        label, body = (s.strip() for s in raw.split("=", 1))
        if not _LABEL.match(label):
            raise _fail(raw, f"label {label!r} may hold only letters, digits, '_', '.', '-'")
    parts = [p.strip() for p in body.split("+")]
    if not all(parts):
        raise _fail(raw, "has an empty part around '+'")
    mode = "off"
    cap_source: str | None = None
    cap_layers: tuple[int, int] | None = None
    cap_pct: float | None = None
    cap_rule: str | None = None
    cap_keep: float | None = None
    steering: Steering | None = None
    canon: list[str] = []
    baseline = False
    for part in parts:
        low = part.lower()
        if low in ("unsteered", "baseline", "off"):
            baseline = True
            canon.append("unsteered")
            continue
        if low in ("capped", "adaptive") or _CAP.match(low):
            if cap_source is not None:
                raise _fail(raw, "has two capping parts; use one")
            if low in ("capped", "adaptive"):
                mode = "on" if low == "capped" else "adaptive"
                cap_source = "bundle"
                canon.append(low)
                continue
            match = _CAP.match(low)
            assert match is not None
            kind, lo_s, hi_s, unit, amount_s, rule_s = match.groups()
            mode = "on" if kind == "cap" else "adaptive"
            cap_source = "calibrate"
            cap_layers = _window(raw, lo_s, hi_s)
            cap_rule, cap_pct, cap_keep = _cap_rule(raw, unit, amount_s, rule_s)
            head = f"{kind}:{_window_text(cap_layers)}"
            if cap_keep is not None:
                canon.append(f"{head}@keep{_num(cap_keep)}")
            else:
                assert cap_pct is not None
                tail = "" if cap_rule == DEFAULT_RULE else f"/{cap_rule}"
                canon.append(f"{head}@p{_num(cap_pct)}{tail}")
            continue
        if low.startswith("steer:"):
            if steering is not None:
                raise _fail(raw, "has two steering parts; use one")
            smatch = _STEER.match(low)
            if smatch is None:
                raise _fail(raw, f"cannot read the steering part {part!r}")
            coef_s, lo_s, hi_s, scale = smatch.groups()
            coef = float(coef_s)
            if not math.isfinite(coef):
                raise _fail(raw, "the steering coefficient must be finite")
            layers = None
            text_layers = ""
            if lo_s is not None:
                window = _window(raw, lo_s, hi_s)
                layers = tuple(range(*window))
                text_layers = "@" + _window_text(window)
            scale = scale or "raw"
            steering = Steering(coef, layers, scale)  # type: ignore[arg-type]
            canon.append(
                f"steer:{_num(coef)}{text_layers}" + ("" if scale == "raw" else f"/{scale}")
            )
            continue
        raise _fail(raw, f"unknown part {part!r}")
    if baseline and len(parts) > 1:
        raise _fail(raw, "'unsteered' cannot be combined with other parts")
    spec = "+".join(canon)
    return Condition(
        name=label or spec,
        spec=spec,
        mode=mode,
        cap_source=cap_source,
        cap_layers=cap_layers,
        cap_percentile=cap_pct,
        steering=steering,
        cap_rule=cap_rule,
        cap_keep=cap_keep,
    )


def _cap_rule(
    spec: str, unit: str | None, amount_s: str | None, rule_s: str | None
) -> tuple[str, float | None, float | None]:
    """(rule, percentile, keep) of a calibrated cap part's ``@...`` and ``/RULE``."""
    if rule_s is not None and rule_s not in RULES:
        raise _fail(spec, f"unknown capping rule {rule_s!r}; use one of {', '.join(RULES)}")
    if unit == "keep":
        if rule_s not in (None, "token-default"):
            raise _fail(spec, f"@keep is the token-default rule's; {rule_s} takes @pPCT")
        rule = "token-default"
    else:
        rule = rule_s or DEFAULT_RULE
        if rule == "token-default" and amount_s is not None:
            raise _fail(spec, "token-default takes @keepKEEP (e.g. @keep99), not a percentile")
    if rule == "token-default":
        keep = DEFAULT_KEEP if amount_s is None else float(amount_s)
        if not 0.0 < keep <= 100.0:
            raise _fail(spec, f"keep {amount_s} is outside (0, 100]")
        return rule, None, keep
    pct = DEFAULT_PERCENTILE if amount_s is None else float(amount_s)
    if not 0.0 <= pct <= 100.0:
        raise _fail(spec, f"percentile {amount_s} is outside 0..100")
    return rule, pct, None


def parse_conditions(specs: str | Iterable[str]) -> list[Condition]:
    """Read a comma-separated list (or a list of specs); names must be unique.

    Raises:
        ConditionError: a bad spec, no condition at all, or two conditions with one name.
    """
    items: list[str] = []
    for chunk in [specs] if isinstance(specs, str) else list(specs):
        items.extend(s.strip() for s in str(chunk).split(",") if s.strip())
    if not items:
        raise ConditionError(f"no condition given\n{GRAMMAR}")
    out = [parse_condition(s) for s in items]
    seen: dict[str, str] = {}
    for cond, text in zip(out, items, strict=True):
        if cond.name in seen:
            raise ConditionError(
                f"conditions {seen[cond.name]!r} and {text!r} are both named {cond.name!r}; "
                "drop one, or label them (LABEL=SPEC)"
            )
        seen[cond.name] = text
    return out


def check_condition(
    condition: Condition, axis: Axis, bundle_capping: CappingConfig | None
) -> CappingConfig | None:
    """Check that the bundle can serve a condition (capping config, calibration, layers).

    Returns:
        The condition's capping config (:func:`build_capping`), built while checking.

    Raises:
        ConditionError: with what is missing and what to use instead.
    """
    cfg = build_capping(condition, axis, bundle_capping)
    if condition.steering is not None and condition.steering.layers is not None:
        bad = [x for x in condition.steering.layers if x >= axis.n_layers]
        if bad:
            raise ConditionError(
                f"condition {condition.name!r} steers on layer(s) {bad}, but the axis has "
                f"{axis.n_layers} layers (0..{axis.n_layers - 1})"
            )
    if condition.steering is not None and condition.steering.scale == "relative":
        if axis.residual_norms is None:
            raise ConditionError(
                f"condition {condition.name!r} uses relative steering, but the bundle records "
                "no residual norms; use /raw or /unit"
            )
    return cfg


def build_capping(
    condition: Condition, axis: Axis, bundle_capping: CappingConfig | None
) -> CappingConfig | None:
    """The capping config a condition uses (None when it does not cap).

    ``capped``/``adaptive`` use the bundle's config; ``cap:A:B@pP`` calibrates a floor on
    blocks ``A..B-1`` at the P-th percentile of the bundle's calibration
    (:meth:`CappingConfig.calibrate`), as the research built its configs; the token rules
    (``/token-roleplay``, ``@keepK``) read the calibration's per-token tables.

    Raises:
        ConditionError: the bundle has no capping config / no calibration (or not the
            per-token table a token rule needs), or the window is outside the model.
    """
    if condition.cap_source is None:
        return None
    if condition.cap_source == "bundle":
        if bundle_capping is None:
            raise ConditionError(
                f"condition {condition.name!r} uses the bundle's capping config, and the bundle "
                "has none (no capping.json); calibrate one instead, e.g. cap:16:24@p25"
            )
        return bundle_capping
    assert condition.cap_layers is not None
    if axis.calibration is None:
        raise ConditionError(
            f"condition {condition.name!r} calibrates a floor, but the bundle has no "
            "calibration.json; use 'capped' with a bundle capping config"
        )
    lo, hi = condition.cap_layers
    if hi > axis.n_layers:
        raise ConditionError(
            f"condition {condition.name!r}: layers {lo}:{hi} go past the axis' "
            f"{axis.n_layers} layers (blocks 0..{axis.n_layers - 1}; the range is half-open)"
        )
    layers = normalize_layers(list(range(lo, hi)), axis.n_layers)
    try:
        return CappingConfig.calibrate(
            axis,
            axis.calibration,
            layers,
            condition.cap_percentile,
            rule=condition.cap_rule or DEFAULT_RULE,
            keep=condition.cap_keep,
        )
    except PersonaCompassError as exc:
        raise ConditionError(f"condition {condition.name!r}: {exc}") from None


def sweep_conditions(
    windows: Sequence[str],
    percentiles: Sequence[float],
    rules: Sequence[str] = (DEFAULT_RULE,),
    keeps: Sequence[float] = (DEFAULT_KEEP,),
) -> list[Condition]:
    """One always-on condition per (rule, window, number): rules first, then windows.

    ``response-mean`` and ``token-roleplay`` sweep ``percentiles``
    (``cap:W@pP``, ``cap:W@pP/token-roleplay``); ``token-default`` sweeps ``keeps``
    (``cap:W@keepK``).

    Raises:
        ConditionError: a window, percentile, keep or rule that cannot be read.
    """
    if not windows or not rules:
        raise ConditionError(
            "a sweep needs at least one window (--windows 16:24,20:28) and one rule "
            f"(--rules {DEFAULT_RULE})"
        )
    specs = []
    for rule in rules:
        if rule not in RULES:
            raise ConditionError(f"rule {rule!r} is unknown; use one of {', '.join(RULES)}")
        amounts = keeps if rule == "token-default" else percentiles
        if not amounts:
            what = (
                "keep (--keeps 99)"
                if rule == "token-default"
                else "percentile (--percentiles 1,25,50)"
            )
            raise ConditionError(f"a sweep with rule {rule} needs at least one {what}")
        for w in windows:
            for x in amounts:
                if rule == "token-default":
                    specs.append(f"cap:{w.strip()}@keep{_num(float(x))}")
                else:
                    tail = "" if rule == DEFAULT_RULE else f"/{rule}"
                    specs.append(f"cap:{w.strip()}@p{_num(float(x))}{tail}")
    return [parse_condition(spec) for spec in specs]


def parse_rules(text: str) -> list[str]:
    """``"response-mean,token-default"`` -> the rule names (each one of the capping RULES)."""
    out = [r.strip().lower() for r in text.split(",") if r.strip()]
    for rule in out:
        if rule not in RULES:
            raise ConditionError(f"rule {rule!r} is unknown; use one of {', '.join(RULES)}")
    if not out:
        raise ConditionError(f"no rule given; e.g. --rules {','.join(RULES)}")
    return list(dict.fromkeys(out))


def parse_keeps(text: str) -> list[float]:
    """``"99,95"`` -> ``[99.0, 95.0]`` (each in (0, 100]: the share of default-answer tokens
    the token-default rule leaves untouched)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part.lower().removeprefix("keep"))
        except ValueError:
            raise ConditionError(f"keep {part!r} is not a number; e.g. 99,95") from None
        if not 0.0 < value <= 100.0:
            raise ConditionError(f"keep {part!r} is outside (0, 100]; e.g. 99")
        out.append(value)
    if not out:
        raise ConditionError("no keep given; e.g. --keeps 99,95")
    return out


def parse_windows(text: str) -> list[str]:
    """``"16:24,20:28"`` -> ``["16:24", "20:28"]`` (each checked against the grammar)."""
    out = [w.strip() for w in text.split(",") if w.strip()]
    for w in out:
        if not re.fullmatch(_WINDOW, w):
            raise ConditionError(
                f"window {w!r} is not START:STOP (half-open) or a single layer; e.g. 16:24"
            )
    if not out:
        raise ConditionError("no window given; e.g. --windows 16:24,20:28")
    return out


def parse_percentiles(text: str) -> list[float]:
    """``"1,25,50"`` -> ``[1.0, 25.0, 50.0]`` (each in 0..100)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part.lstrip("pP"))
        except ValueError:
            raise ConditionError(f"percentile {part!r} is not a number; e.g. 1,25,50") from None
        if not 0.0 <= value <= 100.0:
            raise ConditionError(f"percentile {part!r} is outside 0..100")
        out.append(value)
    if not out:
        raise ConditionError("no percentile given; e.g. --percentiles 1,25,50")
    return out


def condition_slug(name: str) -> str:
    """A file-name-safe form of a condition name (unique: a hash is added when it changed)."""
    import hashlib

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "condition"
    if slug != name:
        slug += "-" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:6]
    return slug
