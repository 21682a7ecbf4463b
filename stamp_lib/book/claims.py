"""The claims registry: every claim of the paper (or open question) the book tests, registered
once, and how a verdict on it is written and shown.

A chapter attaches its result with ``run.verdict(key, verdict, ours, numbers=..., conditions=...)``
(:mod:`stamp_lib.book.study`); an unknown key or a verdict that does not start with one of
:data:`VERDICTS` is an error right there. The claims page lists :data:`CLAIMS` and the verdicts
found in the results files, generically: a new chapter's claims appear on it without editing it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Claim", "CLAIMS", "VERDICTS", "claim", "verdict_status", "format_conditions", "numbers_text", "Judgement",
           "judge", "signed"]


@dataclass(frozen=True)
class Claim:
    """One claim of the paper (or open question) that the book tests.

    ``title``: a few words, used in tables. ``claim``: the claim in one or two sentences (MyST
    Markdown; maths in ``$...$``). ``where``: the paper's figure, table or section. ``paper``:
    the paper's number(s) for it, or what the paper says when it gives none (its figures,
    tables and text, arXiv 2510.26771; never a number the paper does not state). ``chapters``: the
    notebooks expected to test it.
    """

    title: str
    claim: str
    where: str
    paper: str
    chapters: tuple[str, ...] = ()


CLAIMS: dict[str, Claim] = {
    "theorem1_holds": Claim(
        "Theorem 1 bounds the error",
        r"For an orthogonal $L$ and per-token min-max quantization without clipping, "
        r"$\lVert L^{-1}Q(LX)-X\rVert^2 \le \frac d2 \sum_i \lVert l_iX\rVert^2/(2^{b_i}-1)^2$.",
        "Theorem 1",
        "a proved bound; the paper reports no measured tightness",
        ("01_theorem1",),
    ),
    "white_noise_no_gain": Claim(
        "No local correlation, no gain",
        "A sequence transform helps only where activations are correlated along the sequence; "
        "on inputs without local structure it gains nothing.",
        "Sec. 3",
        "argued (STaMP is not applied to inputs without local structure); no number",
        ("01_theorem1",),
    ),
    "optimal_vs_two_level": Claim(
        "Log-energy bits vs two levels",
        r"The allocation that minimises the bound gives row $i$ a width of $\log_2\sqrt{e_i} - C$ bits; the "
        "experiments use two levels instead (64 rows at 8 bits, the rest at 4).",
        "Sec. 2, corollary of Theorem 1",
        "derived, not measured; the two-level rule spends 4.125 bits on average at $s = 2048$",
        ("01_theorem1", "05_ablations"),
    ),
    "dct_wht_dwt_close": Claim(
        "DCT, WHT and DWT alike, far above identity",
        "DCT, WHT and Haar DWT perform about the same, far better than no sequence transform.",
        "Fig. 7",
        "qualitative (no numbers recovered)",
        ("02_real_activations", "05_ablations"),
    ),
    "dct_approximates_klt": Claim(
        "The DCT approximates the KLT",
        "Sequence autocorrelations are close to Toeplitz, so the DCT approximates the KLT, the "
        "transform that concentrates energy best.",
        "Sec. 3",
        "argued from the Toeplitz structure; not measured",
        ("02_real_activations",),
    ),
    "klt_gap": Claim(
        "Gap to a calibrated KLT",
        "How far the best practical transform (DCT, WHT or DWT) is from a KLT calibrated on "
        "other data, on real activations.",
        "open question",
        "not measured",
        ("02_real_activations", "05_ablations"),
    ),
    "few_hp_tokens": Claim(
        "A few 8-bit tokens suffice",
        "SQNR rises sharply with even a few high-precision tokens.",
        "Fig. 4b",
        "qualitative (no numbers recovered)",
        ("04_images", "05_ablations"),
    ),
    "mean_token": Claim(
        "More than the mean token",
        "STaMP's gain comes from the correlation between tokens that the transform concentrates "
        "into a few rows, not only from separating the mean token.",
        "Sec. 3 (premise)",
        "not tested: the paper does not separate the share of the gain that the mean token carries",
        ("05_ablations",),
    ),
    "w4a4kv4_perplexity": Claim(
        "STaMP lowers LLM perplexity",
        "At W4A4KV4, adding STaMP lowers WikiText-2 perplexity for every baseline (RTN, "
        "SmoothQuant, QuaRot, FlatQuant), most on small models.",
        "Table 2",
        "Llama-3.2-1B-it: RTN 1795 → 700, SmoothQuant 883 → 407, QuaRot 25.78 → 23.72, "
        "FlatQuant 15.72 → 15.16 (FP 13.16). Llama-3-8B: RTN 668 → 95.3, QuaRot 9.05 → 8.66, "
        "FlatQuant 6.89 → 6.77 (FP 6.14). 2048-token windows, 4.125 activation bits on average",
        ("03_llm",),
    ),
    "llm_gain_where_worst": Claim(
        "LLM gains largest where the baseline is worst",
        "STaMP's perplexity gain is largest where the baseline is worst (small models, RTN), "
        "smallest where rotations already keep the model close to full precision.",
        "Table 2",
        "Llama-3.2-1B-it RTN 1795 → 700 vs QuaRot 25.78 → 23.72; Llama-3-8B RTN 668 → 95.3 vs "
        "QuaRot 9.05 → 8.66",
        ("03_llm",),
    ),
    "llm_levels": Claim(
        "Haar levels and STaMP on K/V (LLM)",
        "How many Haar levels to use on 2048 tokens with 64 high-precision rows, and whether keys and "
        "values should get the sequence transform too.",
        "not stated",
        "no ablation; the overhead study uses 3 levels, and whether K/V get the transform is not said",
        ("03_llm",),
    ),
    "lvm_sqnr": Claim(
        "STaMP raises image-model SQNR",
        "Image generators at W4A4: adding STaMP raises SQNR (and ImageReward).",
        "Table 1",
        "SQNR (dB), PixArt-Σ COCO: RTN 5.88 → 6.16, SVDQuant 8.78 → 9.72; MJHQ: RTN 5.75 → 6.23, "
        "ViDiT-Q 7.55 → 8.53, SVDQuant 8.83 → 9.75; SANA COCO: RTN 8.63 → 9.32, SVDQuant "
        "9.99 → 10.69. 4096 tokens, 4.0625 bits on average",
        ("04_images",),
    ),
    "feature_sequence_complementary": Claim(
        "Feature and sequence transforms add up",
        "A feature (Hadamard) transform and a sequence transform are complementary: both together "
        "beat either alone.",
        "Fig. 1",
        "PixArt-Σ, 4-bit activations, SQNR (dB): none 0.64; one transform 5.00, the other 7.07 "
        "(most likely STaMP 5.00, Hadamard 7.07); both 11.47",
        ("04_images",),
    ),
    "causality": Claim(
        "Causality",
        "A sequence transform lets future tokens change the quantization of past ones in a causal "
        "LM: how much, its effect on perplexity, and whether a causal-safe (block-wise) variant works.",
        "not discussed",
        "the paper evaluates full sequences (prefill) and does not discuss causality",
        ("06_causality",),
    ),
    "overhead": Claim(
        "Small overhead",
        "A 3-level Haar DWT adds little compute and latency to the linear layers it feeds.",
        "Sec. 5 (overhead)",
        "0.21% extra FLOPs, 4.8% extra latency (A100, CUDA kernel); the FLOP count is not shown",
        ("06_causality",),
    ),
}

# A verdict starts with one of these words (longest first), optionally followed by ": ..." or
# "; ..." saying more.
VERDICTS = ("partly confirmed", "not confirmed", "confirmed", "refuted", "new")


@dataclass(frozen=True)
class Judgement:
    """The verdict of :func:`judge`: ``status`` (a :data:`VERDICTS` word), ``reason`` (one
    sentence naming every comparison that is not on the claim's side beyond its interval) and the
    labels in each group."""

    status: str
    reason: str
    agree: tuple = ()
    unclear: tuple = ()
    against: tuple = ()

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


def signed(x: float) -> str:
    """A difference for the prose: sign and two decimals (two significant digits below 0.005)."""
    x = float(x)
    if x != x:
        return "n/a"
    return f"{x:+.2f}" if abs(x) >= 0.005 or x == 0 else f"{x:+.2g}"


def _interval_text(e: dict, unit: str) -> str:
    return f"{signed(e['mean'])} [{signed(e['ci_lo'])}, {signed(e['ci_hi'])}]{unit}"


def judge(effects: dict, *, better: str, unit: str = "", what: str = "STaMP helps") -> Judgement:
    """The one verdict rule of the book. ``effects``: ``{label: comparison}``, one per model and
    baseline the claim covers, each a dict with ``mean``, ``ci_lo``, ``ci_hi`` (the 95% interval
    of a paired difference, :mod:`stamp_lib.core.stats`); ``better``: the side the claim predicts
    (``"lower"``: a negative difference, e.g. NLL; ``"higher"``: a positive one, e.g. SQNR).

    ``confirmed`` only when every interval lies on the predicted side of zero; ``not confirmed``
    when none does; ``partly confirmed`` otherwise. The reason names the comparisons whose
    interval holds zero and those on the other side, with their intervals; ``what`` is its subject
    and verb (e.g. ``"STaMP lowers the mean NLL"``), ``unit`` follows each interval."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    if not effects:
        raise ValueError("judge needs at least one comparison")
    sign = -1.0 if better == "lower" else 1.0
    agree, unclear, against = [], [], []
    for label, e in effects.items():
        lo, hi = sign * e["ci_lo"], sign * e["ci_hi"]
        lo, hi = min(lo, hi), max(lo, hi)
        if not (lo == lo and hi == hi):  # NaN interval (one unit): not beyond anything
            unclear.append(label)
        elif lo > 0:
            agree.append(label)
        elif hi < 0:
            against.append(label)
        else:
            unclear.append(label)
    n = len(effects)
    parts = []
    if unclear:
        parts.append("interval holds zero on " + "; ".join(f"{k} {_interval_text(effects[k], unit)}" for k in unclear))
    if against:
        parts.append("the other way on " + "; ".join(f"{k} {_interval_text(effects[k], unit)}" for k in against))
    if len(agree) == n:
        every = {1: "the one comparison", 2: "both comparisons"}.get(n, f"all {n} comparisons")
        status, reason = "confirmed", f"{what} beyond the 95% interval in {every}"
    elif agree:
        status = "partly confirmed"
        reason = f"{what} beyond the 95% interval in {len(agree)} of {n} comparisons; " + "; ".join(parts)
    else:
        status = "not confirmed"
        reason = f"{what}: in none of the {n} comparisons beyond the 95% interval; " + "; ".join(parts)
    return Judgement(status, reason, tuple(agree), tuple(unclear), tuple(against))


def claim(key: str) -> Claim:
    """The registered claim ``key``; ``KeyError`` naming the known keys otherwise."""
    if key not in CLAIMS:
        raise KeyError(f"unknown claim key {key!r}; registered: {sorted(CLAIMS)}. "
                       "Register it in stamp_lib.book.claims.CLAIMS (title, claim, where, paper's number).")
    return CLAIMS[key]


def verdict_status(verdict: str) -> str:
    """The leading word of a verdict (one of :data:`VERDICTS`); ``ValueError`` if there is none."""
    v = verdict.strip().lower()
    for word in VERDICTS:
        if v == word or v.startswith(word + ":") or v.startswith(word + ";") or v.startswith(word + " "):
            return word
    raise ValueError(f"a verdict must start with one of {VERDICTS}, got {verdict!r}")


def format_conditions(cond: dict) -> str:
    """``{"s": 256, "bits": "64x8+4"}`` -> ``s = 256, bits 64x8+4`` (for tables and prose)."""
    parts = []
    for k, v in cond.items():
        if isinstance(v, float):
            v = _short(v)
        elif isinstance(v, (list, tuple)):
            v = ", ".join(_short(x) if isinstance(x, float) else str(x) for x in v)
        parts.append(f"{k} = {v}" if len(k) <= 2 else f"{k} {v}")
    return ", ".join(parts)


def _short(v: float) -> str:
    """A setting for the prose: exact when five significant digits hold it (4.125, 4.0625 bits),
    else three (:func:`stamp_lib.book.plotting.num`)."""
    from .plotting import num

    t = f"{v:.5g}"
    return t if float(t) == v and "e" not in t else num(v)


def numbers_text(v: dict | None) -> str:
    """``**status**; label: number; ...`` for a findings table: three significant digits
    (:func:`stamp_lib.book.plotting.num`), or ``not recorded``."""
    if v is None:
        return "not recorded"
    from .plotting import num

    nums = "; ".join(f"{k}: {num(x)}" for k, x in v.get("numbers", {}).items())
    return f"**{v.get('status') or v['verdict']}**" + (f"; {nums}" if nums else "")
