"""``report.json``: the results of a run, built from its manifests.

Schema (all accuracies are fractions in [0, 1]):

```
{
  "run": "<name>-<hash>", "run_uri": "...", "config_hash": "...", "code_version": "...",
  "method": "rded", "dataset": "fashion-mnist", "ipc": 10, "factor": 1, "classes": 10,
  "teacher": {"model": "convnet", "val_accuracy": 0.93, "val_images": 6000,   # on the validation split (null
              "origin": "trained" | "<checkpoint uri>"},                    # without one); never the test split
  "student": "convnet",                                        # evaluation.model's name
  "ensemble": [{"model": "mobilenet_v2", "val_accuracy": 0.9, ...}],   # teacher.ensemble, in order
  "labels": {"temperature": 20.0, "dtype": "float16", "top_k": null,
             "bytes": 123, "bytes_per_image": 12.3},           # distilled set's label files
  "regimes": {
    "<hard|soft|soft_kd>": {
      "distilled": {"mean": 0.8, "std": 0.01, "values": [...]},   # test accuracy, one value per seed
      "random":    {"mean": 0.7, "std": 0.01, "values": [...],    # every draw x seed (draw-major); mean null when
                    "draws": 3, "draw_means": [...]},              # evaluation.baseline is off; each subset's mean
      "full":      {"mean": 0.9, ...},   # hard only, with evaluation.full: the whole training split, same budget
      "improvement_over_random": 0.1,                                # DD-Ranking's IOR (null without baseline)
      "comparison": {"difference": 0.1, "ci95": [0.05, 0.15],       # ddpipe.scores.against_random: the set
                     "verdict": "above", "method": "prediction-t",    # against a new random subset (2+ draws:
                     "random_units": "subsets", "subsets": 3,         # 95 % t prediction interval), with
                     "welch": {"ci95": [0.08, 0.12], "verdict": "above"}},  # Welch's interval of the means;
                                                                     # 1 draw: welch-t over its students
      "steps": 600                                                   # student steps of each run
    }
  },
  "scores": {"hard_label_recovery": 0.1,                  # full - distilled under hard labels (needs "full")
             "label_robust_score": {"<regime>": 0.4}},     # DD-Ranking LRS of that regime's IOR and the HLR
  "cross_architecture": [{"model": {"name": "resnet18_small", ...}, "regimes": {as above}}],  # evaluation.cross_models
  "generation": {"generated_images": 1000, "frechet_distance": 12.3,   # diffusion only (else null):
                 "teacher_accuracy": 0.9, "teacher_accuracy_per_class": {...},  # generation/quality.json
                 "reference_images": 10000, "sampling_seconds": 60.0, "images_per_second": 16.7},
  "stages": {"<stage>": {"seconds": 1.2, "shards": 5, "files": 10, "bytes": 1234}},
  "total_seconds": 12.3
}
```
"""

from __future__ import annotations

import json

from ddpipe.codehash import CODE_VERSION
from ddpipe.evaluate import student_models, summarize
from ddpipe.imageset import draw_of, image_grid, png_bytes, read_class, side_of
from ddpipe.manifests import StageManifest, stage_files
from ddpipe.pipeline import Context
from ddpipe.scores import against_random, hard_label_recovery, label_robust_score

GRID_CLASSES, GRID_IMAGES = 20, 10  # distilled/grid.png shows at most this many classes and images per class


def build_report(ctx: Context, manifests: dict[str, StageManifest], timings: dict[str, float]) -> dict:
    cfg, store = ctx.cfg, ctx.store
    results = [store.read_json(f.path) for f in stage_files(store, manifests["evaluation"])]
    regimes = regime_results(results, cfg.evaluation.regimes, student=0)
    cross = [{"model": spec.model_dump(mode="json"), "regimes": regime_results(results, cfg.evaluation.regimes, k)}
             for k, spec in enumerate(student_models(cfg)) if k > 0]
    label_files = [f for f in stage_files(store, manifests["labels"]) if f.path.startswith("distilled/")]
    label_bytes = sum(f.bytes for f in label_files)
    num_classes = store.read_table("dataset/classes.parquet").num_rows
    n_images = cfg.method.ipc * num_classes
    teacher = store.read_json("teacher/metrics.json")
    ensemble = [store.read_json(f"teacher/member{k}.json") for k in range(1, len(cfg.teacher_models))]
    return {
        "run": cfg.run_name,
        "run_uri": store.uri,
        "config_hash": cfg.hash(),
        "code_version": CODE_VERSION,
        "method": cfg.method.name,
        "dataset": cfg.dataset.kind,
        "ipc": cfg.method.ipc,
        "factor": cfg.factor,
        "classes": num_classes,
        "teacher": {"model": cfg.teacher.model.name, **teacher},
        "student": cfg.evaluation.model.name,
        "ensemble": ensemble,
        "labels": {
            "temperature": cfg.labels.temperature, "dtype": cfg.labels.dtype, "top_k": cfg.labels.top_k,
            "bytes": label_bytes, "bytes_per_image": label_bytes / max(1, n_images),
        },
        "regimes": regimes,
        "warnings": (validation_gaps(store.read_table("dataset/classes.parquet"), cfg.has_val_split)
                     + far_below_random(regimes) + refused_comparisons(regimes)),
        "scores": scores(regimes),
        "cross_architecture": cross,
        "generation": generation_summary(store, manifests),
        "stages": {
            name: {"seconds": round(timings.get(name, 0.0), 3), "shards": m.shards, "files": m.files, "bytes": m.bytes}
            for name, m in manifests.items()
        },
        "total_seconds": round(sum(timings.values()), 3),
    }


def generation_summary(store, manifests: dict[str, StageManifest]) -> dict | None:
    """The diffusion method's generated pool: quality.json plus the sampling speed over every generation shard."""
    if "quality" not in manifests:
        return None
    shards = [store.read_json(f.path) for f in stage_files(store, manifests["generation"])
              if f.path.startswith("generation/") and f.path.endswith(".json")]
    seconds = sum(s["seconds"] for s in shards)
    images = sum(sum(s["images"].values()) for s in shards)
    return {**store.read_json("generation/quality.json"), "sampling_seconds": round(seconds, 3),
            "images_per_second": round(images / max(seconds, 1e-9), 3)}


def regime_results(results: list[dict], regimes, student: int) -> dict:
    """Per regime: the distilled set's accuracies over seeds and the random subsets' over draws x seeds for one
    student architecture, their difference (IOR) and its verdict (:func:`ddpipe.scores.against_random`)."""
    out = {}
    for regime in regimes:
        entry, recipes = {}, {}
        for side in ("distilled", "random"):
            rows = sorted((r for r in results if r["regime"] == regime and side_of(r["set"]) == side
                           and r.get("student", 0) == student), key=lambda r: (draw_of(r["set"]), r["seed"]))
            entry[side] = summarize([test_accuracy(r) for r in rows])
            recipes[side] = rows
            if rows:
                entry["steps"] = rows[0]["steps"]
        subsets: dict[str, list[float]] = {}
        for row in recipes["random"]:
            subsets.setdefault(row["set"], []).append(test_accuracy(row))
        entry["random"]["draws"] = len(subsets)
        entry["random"]["draw_means"] = [sum(v) / len(v) for v in subsets.values()]  # in draw order
        full = [test_accuracy(r) for r in sorted(results, key=lambda r: r["seed"])
                if r["regime"] == regime and r["set"] == "full" and student == 0]
        if full:
            entry["full"] = summarize(full)
        d, r = entry["distilled"]["mean"], entry["random"]["mean"]
        difference = recipe_difference(recipes["distilled"], recipes["random"])
        if difference is None:
            entry["improvement_over_random"] = None if d is None or r is None else d - r
            entry["comparison"] = comparison(entry)
        else:  # students trained differently: no difference is reported
            entry["improvement_over_random"] = None
            entry["comparison"] = {"difference": None, "ci95": None, "verdict": "refused", "method": "welch-t",
                                   "reason": f"not compared: {difference}"}
        out[regime] = entry
    return out


def comparison(entry: dict) -> dict:
    """One regime's verdict (:func:`ddpipe.scores.against_random`) from its entry in report.json: the distilled
    seeds against the random subsets' means (``draw_means``; a report written before them has its draw-major
    ``values`` split evenly over its ``draws``)."""
    return against_random(entry["distilled"]["values"], entry["random"]["values"], draw_means(entry["random"]))


def draw_means(random: dict) -> list[float] | None:
    """Each random subset's mean over the seeds: ``draw_means``, or for a report written before them its
    draw-major ``values`` split evenly over its ``draws`` (None when they do not split evenly)."""
    if random.get("draw_means") is not None:
        return random["draw_means"]
    n, values = random.get("draws", 0), random["values"]
    if n < 1 or len(values) % n:
        return None
    k = len(values) // n
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def reverdict(report: dict) -> dict:
    """``report`` (a run's report.json) with every regime's verdict recomputed by this code, for every student
    architecture; a comparison refused because the students differ stays refused (the recipes are not in it)."""
    def redo(regimes: dict) -> dict:
        out = {}
        for name, e in regimes.items():
            e = {**e, "random": {**e["random"], "draw_means": draw_means(e["random"])}}
            out[name] = e if (e.get("comparison") or {}).get("verdict") == "refused" else {**e, "comparison": comparison(e)}
        return out

    return {**report, "regimes": redo(report["regimes"]),
            "cross_architecture": [{**c, "regimes": redo(c["regimes"])} for c in report.get("cross_architecture", [])]}


def test_accuracy(result: dict) -> float:
    """A student's final test accuracy (``top1`` in result files written before the validation split)."""
    return result["test_accuracy"] if "test_accuracy" in result else result["top1"]


RECIPE = ("steps", "batch_size", "model", "images", "test_images", "ema", "cosine_period")  # held equal


def recipe_difference(distilled: list[dict], random: list[dict]) -> str | None:
    """How the students of a distilled set and of its random subset differ (steps, batch size, model, images,
    test images, EMA, schedule), or None when they do not: students trained differently are not compared."""
    for field in RECIPE:
        a = {json.dumps(r.get(field), sort_keys=True) for r in distilled}
        b = {json.dumps(r.get(field), sort_keys=True) for r in random}
        if a and b and a != b:
            return f"the distilled and random students differ in {field} ({', '.join(sorted(a))} vs {', '.join(sorted(b))})"
    return None


FAR_BELOW_RANDOM = 0.03  # a distilled set this far below its random subset (3 points) is flagged


def validation_gaps(classes, has_val_split: bool) -> list[str]:
    """A warning when the validation split holds no image of some classes (a class with one training image keeps
    it for training): the teacher gate and any setting chosen on validation do not see them. A warning, not a
    refusal: such a class can still be distilled and tested."""
    rows = classes.to_pylist()
    gaps = [r["class_name"] for r in rows if has_val_split and r["val_images"] == 0 and r["train_images"] > 0]
    if not gaps:
        return []
    names = ", ".join(f"'{n}'" for n in gaps[:3]) + (", ..." if len(gaps) > 3 else "")
    return [f"the validation split has no images of {len(gaps)} of the {len(rows)} classes ({names}: one training "
            "image each); the teacher gate and settings chosen on validation do not see them"]


def far_below_random(regimes: dict) -> list[str]:
    """A warning per regime whose distilled set is more than FAR_BELOW_RANDOM below its random subset: the
    method's defaults probably do not fit the data."""
    return [f"the distilled set is {100 * -e['improvement_over_random']:.1f} points below its random subset in "
            f"the {regime} regime: check that the method's settings fit this data"
            for regime, e in regimes.items()
            if e["improvement_over_random"] is not None and e["improvement_over_random"] < -FAR_BELOW_RANDOM]


def refused_comparisons(regimes: dict) -> list[str]:
    """A warning per regime whose distilled and random students were trained differently (not compared)."""
    return [f"{regime} regime {e['comparison']['reason']}" for regime, e in regimes.items()
            if e.get("comparison", {}).get("verdict") == "refused"]


def scores(regimes: dict) -> dict:
    """DD-Ranking's scores from one architecture's regime results: HLR (needs the full-set student under hard
    labels) and, per regime, the label-robust score of that regime's IOR and the HLR."""
    hard = regimes.get("hard", {})
    full, distilled = hard.get("full", {}).get("mean"), hard.get("distilled", {}).get("mean")
    hlr = None if full is None or distilled is None else hard_label_recovery(full, distilled)
    lrs = {regime: None if hlr is None or e["improvement_over_random"] is None
           else label_robust_score(e["improvement_over_random"], hlr) for regime, e in regimes.items()}
    return {"hard_label_recovery": hlr, "label_robust_score": lrs}


def distilled_grid(ctx: Context, num_classes: int) -> bytes:
    """PNG of the distilled images, a row per class (the first GRID_CLASSES classes, GRID_IMAGES images each)."""
    rows = [read_class(ctx.store, "distilled", c, ctx.cfg.channels)[1][:GRID_IMAGES] for c in range(min(num_classes, GRID_CLASSES))]
    return png_bytes(image_grid(rows))


def write_report(ctx: Context, manifests: dict[str, StageManifest], timings: dict[str, float]) -> dict:
    """Write report.json and distilled/grid.png (what the UI shows of a run)."""
    report = build_report(ctx, manifests, timings)
    ctx.store.write_bytes("distilled/grid.png", distilled_grid(ctx, report["classes"]), if_changed=True)
    ctx.store.write_bytes("report.json", json.dumps(report, indent=1).encode())
    return report


def regime_entries(report: dict) -> list[tuple[str | None, str, dict]]:
    """Every (student, regime, results) of a report: the main student's first (student None), then each cross
    architecture's, named by its model."""
    return [(None, r, e) for r, e in report["regimes"].items()] + [
        (c["model"]["name"], r, e) for c in report.get("cross_architecture", []) for r, e in c["regimes"].items()]


def results_rows(report: dict) -> list[dict]:
    """The results as table rows (percent): per student and regime, the distilled set, the random subsets of
    the same size (pooled over their draws), the difference with its 95 % interval and verdict
    (:func:`ddpipe.scores.against_random`) and Welch's verdict on the two means, plus the full set where measured."""

    def pct(v):
        return None if v is None else round(100 * v, 2)

    def row(student, regime, e):
        comparison = e.get("comparison", {})
        low, high = comparison.get("ci95") or (None, None)
        return {"student": student or report["student"], "regime": regime,
                "distilled": pct(e["distilled"]["mean"]), "distilled_std": pct(e["distilled"]["std"]),
                "random": pct(e["random"]["mean"]), "random_std": pct(e["random"]["std"]),
                "random_draws": e["random"].get("draws"),
                "gain": pct(e["improvement_over_random"]), "gain_ci95_low": pct(low), "gain_ci95_high": pct(high),
                "verdict": comparison.get("verdict"), "mean_verdict": (comparison.get("welch") or {}).get("verdict"),
                "full": pct(e.get("full", {}).get("mean"))}

    return [row(s, r, e) for s, r, e in regime_entries(report)]


def teacher_line(teacher: dict) -> str:
    acc = teacher.get("val_accuracy")
    return "(no validation split)" if acc is None else f"validation top-1 {100 * acc:.2f}%"


def results_table(report: dict) -> str:
    """The results as a fixed-width text table (percent)."""

    def cell(s):
        return f"{100 * s['mean']:6.2f} ± {100 * s['std']:5.2f}" if s["mean"] is not None else "   n/a"

    def delta(d):
        return f"{100 * d:+7.2f}" if d is not None else "    n/a"

    rows = [(f"{student} {regime}" if student else regime, e) for student, regime, e in regime_entries(report)]
    width = max([9] + [len(name) for name, _ in rows])
    welch = any("welch" in (e.get("comparison") or {}) for _, _, e in regime_entries(report))
    lines = [
        f"{report['method']} {report['dataset']} ipc={report['ipc']}  teacher {teacher_line(report['teacher'])}  "
        f"labels {report['labels']['bytes']} bytes",
        f"{'regime':<{width}} {'distilled':>16} {'random':>16} {'Δ':>7}  95% interval of Δ, verdict"
        + ("  (Welch on the means)" if welch else ""),
    ]
    for name, e in rows:
        c = e.get("comparison") or {}
        ci = c.get("ci95")
        verdict = (f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] {c['verdict']}" if ci
                   else "refused (see the warning)" if c.get("verdict") == "refused"
                   else "n/a (fewer than 2 accuracies a side)" if c else "")
        if c.get("welch"):
            w = c["welch"]
            verdict += (f"  (Welch [{100 * w['ci95'][0]:+.2f}, {100 * w['ci95'][1]:+.2f}] {w['verdict']})"
                        if w.get("ci95") else "  (Welch n/a)")
        lines.append(f"{name:<{width}} {cell(e['distilled']):>16} {cell(e['random']):>16} "
                     f"{delta(e['improvement_over_random'])}  {verdict}".rstrip())
    draws = {e["random"].get("draws") for _, _, e in regime_entries(report)} - {None, 0}
    if draws:
        n = max(draws)
        lines.append(f"random: {n} random subsets x the same student seeds; the interval is the 95 % t prediction "
                     "interval of the set against a new random subset (Welch's interval of the set's mean against "
                     "the subsets' mean in brackets)" if n > 1 else
                     "random: 1 random subset(s) x the same student seeds; the interval is Welch's t interval of the "
                     "difference of means over the students (one subset: it does not carry the spread between "
                     "subsets)")
    hard = report["regimes"].get("hard", {})
    if "full" in hard:
        hlr = report["scores"]["hard_label_recovery"]
        lines.append(f"full training set, hard labels, same budget: {cell(hard['full']).strip()}   "
                     f"HLR {delta(hlr).strip()}   LRS " + "  ".join(
                         f"{r} {v:.3f}" for r, v in report["scores"]["label_robust_score"].items() if v is not None))
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    g = report.get("generation")
    if g:
        lines.append(f"generated pool: {g['generated_images']} images at {g['images_per_second']:.2f}/s, teacher "
                     f"top-1 on it {100 * g['teacher_accuracy']:.2f}%, Frechet distance (teacher features) "
                     f"{g['frechet_distance']:.3f}")
    return "\n".join(lines)
