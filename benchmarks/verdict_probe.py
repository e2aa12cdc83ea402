"""Candidate verdict probes side by side (issue: one data-free default, eleventh round).

The default's verdict is the blend search's anomaly index (blend ratio 0.1); on an unseen case (SIG,
FedAvg, target 0, attack rounds 1-15 of 20) it found nothing (target index 0.00). This measures, on
the same synthetic samples (a copy of G fitted to T's priors, as the verdict uses), per class k:
a universal perturbation of a given form that makes T answer k, and its cross-entropy on a fresh
batch. Forms: blend at a ratio, (1 - r) x + r p; additive within an L-inf budget, x + e tanh(q).
The anomaly index per form (Neural Cleanse's, on log losses) is what a verdict would threshold;
`worst_*` is the same per class on the hardest source class (T's clean answer) instead of the mean.
(Run 1 of benchmarks/results/verdict_probe.md also had blend 0.05 and additive 0.1; they separated no
better and were dropped.)
The true attack is printed beside the evidence, never given to a probe.

    python -m benchmarks.verdict_probe [--sets dev late clean] [--out FILE]
    python -m benchmarks.verdict_probe --sets dev temporal-held-out --default-verdict --out FILE
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.default_cases import CASE_SETS, DEV, LATE, history_models, plant, plant_history
from defense.blend_search import ClassPatterns
from defense.cli import field_pairs
from defense.dhbe import DHBETrainer, recipe_config, smoke_sized
from defense.generators import blend_patterns
from defense.models import frozen
from defense.modelio import load_model
from federated.run_folder import round_model_file

FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "blend0.1": lambda x, q: blend_patterns(x, torch.tanh(q), 0.1),
    "add0.05": lambda x, q: (x + 0.05 * torch.tanh(q)).clamp(0, 1),
}
# case sets probed whole, in this order, after dev and LATE's backdoored ("late") and clean ("clean") parts
WHOLE_SETS = ("late-held-out", "temporal-held-out", "shared-generator-held-out", "false-alarm-held-out",
              "robust-aggregation", "mask-size-held-out")


def invert(model, samples, k: int, form, steps: int, lr: float, like: torch.Tensor) -> torch.Tensor:
    raw = torch.zeros_like(like, requires_grad=True)
    optimiser = torch.optim.Adam([raw], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            x = samples()
        loss = F.cross_entropy(model(form(x, raw)), torch.full((len(x),), k, dtype=torch.long))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return raw.detach()


def probe(path: Path, tiny: bool, steps: int, forms: tuple[str, ...] = tuple(FORMS)) -> dict:
    loaded = load_model(path)
    recipe = recipe_config("default")
    if tiny:
        recipe = smoke_sized(recipe)
    trainer = DHBETrainer(loaded.model.eval(), loaded.spec, recipe)
    search = trainer.extension("blend_search")
    started = time.perf_counter()
    generator = search.search_generator
    generator.load_state_dict(trainer.sample_generator.state_dict())
    optimiser = torch.optim.Adam(generator.parameters(), lr=trainer.config.generator_lr)
    for _ in range(search.config.warmup_steps):
        trainer.generator_step(generator, optimiser)
    generator.eval()
    samples = lambda: trainer.spec.denormalise(generator(trainer.latent(trainer.config.latent_dim)))
    with torch.no_grad():
        held = torch.cat([samples() for _ in range(4)])   # fresh batches the losses are measured on
        sources = trainer.teacher.eval()(held).argmax(1)  # T's answer on each clean sample
    teacher = trainer.teacher.eval()
    classes = list(range(trainer.spec.num_classes))
    result = {"warmup_s": round(time.perf_counter() - started, 1)}
    with frozen(teacher):
        for name, form in ((n, FORMS[n]) for n in forms):
            began = time.perf_counter()
            losses, flips, worst_losses, worst_flips = [], [], [], []
            for k in classes:
                raw = invert(teacher, samples, k, form, steps, search.config.lr, held[0])
                with torch.no_grad():
                    logits = teacher(form(held, raw))
                    each = F.cross_entropy(logits, torch.full((len(held),), k), reduction="none")
                    hit = (logits.argmax(1) == k).float()
                    losses.append(float(each.mean()))
                    flips.append(float(hit.mean()))
                    # per source class (T's clean answer), the hardest one other than k itself
                    groups = [c for c in classes if c != k and int((sources == c).sum()) >= 5]
                    worst_losses.append(max((float(each[sources == c].mean()) for c in groups), default=losses[-1]))
                    worst_flips.append(min((float(hit[sources == c].mean()) for c in groups), default=flips[-1]))
            index = ClassPatterns(classes, torch.zeros(len(classes)), losses).anomaly_index()
            worst_index = ClassPatterns(classes, torch.zeros(len(classes)), worst_losses).anomaly_index()
            top = max(classes, key=lambda c: index[c])
            worst_top = max(classes, key=lambda c: worst_index[c])
            result[name] = {"top": top, "index": round(index[top], 2), "indices": [round(v, 2) for v in index],
                            "losses": [round(v, 4) for v in losses], "flips": [round(v, 3) for v in flips],
                            "worst_top": worst_top, "worst_index": round(worst_index[worst_top], 2),
                            "worst_indices": [round(v, 2) for v in worst_index],
                            "worst_losses": [round(v, 4) for v in worst_losses],
                            "worst_flips": [round(v, 3) for v in worst_flips],
                            "sources": torch.bincount(sources, minlength=len(classes)).tolist(),
                            "s": round(time.perf_counter() - began, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", nargs="*", default=["dev", "late", "clean"],
                        choices=("dev", "late", "clean", *WHOLE_SETS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/verdict_probe.jsonl")
    parser.add_argument("--only", nargs="*", default=None, help="case names")
    parser.add_argument("--history", nargs="*", type=int, default=None, metavar="ROUND",
                        help="probe these rounds' global models of each federated case's run (blend 0.1 only)")
    parser.add_argument("--default-verdict", action="store_true",
                        help="the default's own verdict on each federated case with its earlier global models")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="with --default-verdict: overrides of the default recipe (e.g. verdict.votes=3)")
    parser.add_argument("--candidates", action="store_true",
                        help="with --default-verdict: beside the verdict, the fourteenth round's candidate "
                             "statistics per version and class (held-out losses, ratio 0.05, the final "
                             "model's patterns on earlier versions, pattern similarity)")
    parser.add_argument("--mask-sizes", choices=("final", "all"), default=None,
                        help="with --default-verdict: beside the verdict, Neural Cleanse's smallest mask per class "
                             "on the model (final) or on every version (all); central cases included")
    parser.add_argument("--source-flips", action="store_true",
                        help="with --default-verdict: beside the verdict, each class's blend pattern's flip rate "
                             "per source class, per version; central cases included")
    parser.add_argument("--report", default=None, metavar="JSONL",
                        help="read a --candidates file and print, per run, each statistic's suspects (index > 2 "
                             "in at least 2 versions) and its values at the true target and at the suspects")
    parser.add_argument("--tiny", action="store_true", help="one case at smoke size (CI)")
    args = parser.parse_args()
    if args.report:
        candidate_report(Path(args.report))
        return
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models: list[tuple[str, dict, Callable[[], Path]]] = []
    if args.tiny:
        models = [(DEV[2].name, {"attack": "badnets", "target": 0}, lambda: plant(DEV[2], tiny=True))]
        args.steps = 2
    else:
        chosen = (DEV if "dev" in args.sets else []) + [
            c for c in LATE if ("late" in args.sets and c.kind == "matrix") or ("clean" in args.sets and c.kind != "matrix")] + [
            c for name in WHOLE_SETS if name in args.sets for c in CASE_SETS[name]]
        chosen = [c for c in chosen if not args.only or c.name in args.only]
        if args.default_verdict:
            default_verdict(chosen, args.out, field_pairs(args.set, "--set"), args.candidates, args.mask_sizes,
                            args.source_flips)
            return
        if args.history is not None:
            history(chosen, args.history, args.steps, args.out)
            return
        models += [(c.name, truth(c), lambda c=c: plant(c)) for c in chosen]
    for name, known, path in models:   # `known`: `truth` names the function that the list above calls
        row = {"case": name, "truth": known, **probe(path(), args.tiny, args.steps)}
        print(name, known, {f: (row[f]["top"], row[f]["index"], row[f]["worst_top"], row[f]["worst_index"])
                            for f in FORMS}, flush=True)
        if not args.tiny:
            with Path(args.out).open("a") as sink:
                sink.write(json.dumps(row) + "\n")


def truth(case) -> dict:
    """What the experimenter knows of a case, printed beside the evidence (never given to a probe)."""
    return {"attack": case.matrix_attack or (case.attack.attack if case.poisoned else "none"),
            "target": case.attack.target if case.poisoned else None}


def default_verdict(cases, out: str, overrides: dict | None = None, candidates: bool = False,
                    mask_sizes: str | None = None, source_flips: bool = False) -> None:
    """The default's own verdict, as its game reaches it (the first epoch's probes up to the blend
    search), on each federated case's final global model with the earlier ones the simulation's hook
    hands it (rounds 5, 10, 15 of 20); beside it, what the model alone would have said. With
    `mask_sizes` or `source_flips` (seventeenth round), central cases too (the model alone)."""
    from defense.dhbe.extensions.verdict import voted_suspects

    for case in cases:
        if case.kind == "central":
            if not (mask_sizes or source_flips):
                continue
            final, earlier = load_model(plant(case)), []
        else:
            final_path, earlier_paths = history_models(case)
            final = load_model(final_path)
            earlier = [load_model(path).model.eval() for path in earlier_paths]
        started = time.perf_counter()
        trainer = DHBETrainer(final.model.eval(), final.spec, recipe_config("default", overrides), earlier=earlier)
        with trainer.searches_in_fp32():
            for ext in trainer.extensions:
                ext.probe(trainer)
                if ext.name == "blend_search":
                    break
        search, verdict = trainer.extension("blend_search"), trainer.extension("verdict")
        index = search.found.anomaly_index()
        row = {"case": case.name, "truth": truth(case), "suspects": search.suspects,
               "alone": voted_suspects([index], search.config.suspect_threshold, 1),
               "index": [round(v, 2) for v in index],
               "earlier_index": [[round(v, 2) for v in i] for i in verdict.earlier_index],
               "s": round(time.perf_counter() - started, 1), "overrides": overrides or {}}
        versions = [*earlier, final.model.eval()]
        if candidates:
            row["candidates"] = candidate_statistics(trainer, versions)
        if source_flips:
            row["source_flips"] = source_flip_statistics(trainer, versions)
        if mask_sizes:
            row["mask_sizes"] = mask_size_statistics(trainer, versions if mask_sizes == "all" else versions[-1:])
        print(json.dumps(row), flush=True)
        with Path(out).open("a") as sink:
            sink.write(json.dumps(row) + "\n")


def fitted_samples(trainer) -> Callable[[], torch.Tensor]:
    """Fresh batches of the blend search's copy of G, fitted to the model's priors (pixels in [0, 1])."""
    search = trainer.extension("blend_search")
    search.search_generator.eval()
    return lambda: search.search_batch(trainer)


def searched_versions(trainer, batches: int) -> tuple[list[ClassPatterns], torch.Tensor]:
    """The blend search's per-class patterns on each version (the earlier ones first, the model last),
    and `batches` fresh batches of the fitted G to measure them on."""
    samples = fitted_samples(trainer)
    with torch.no_grad(), trainer.searches_in_fp32():
        x = torch.cat([samples() for _ in range(batches)])
    return [*trainer.extension("verdict").earlier_found, trainer.extension("blend_search").found], x


def candidate_statistics(trainer, versions: list, batches: int = 8) -> dict:
    """Fourteenth round: per version (oldest first, the model last) and class k, on `batches` fresh
    batches of the fitted search G (the same for every version): the cross-entropy towards k of the
    version's own pattern p_k at ratio 0.1 (`held`) and 0.05 (`half`), of the final model's pattern
    (`cross`), the share of samples not already k that p_k flips to k (`flip`), and the cosine of p_k
    with the final model's (`cos`, patterns centred); with each loss list's anomaly index."""
    founds, x = searched_versions(trainer, batches)
    final = founds[-1].patterns
    out: dict = {key: [] for key in ("held", "half", "cross", "flip", "cos")}
    with torch.no_grad(), trainer.searches_in_fp32():
        for model, found in zip(versions, founds):
            model.eval()
            clean = model(x).argmax(1)
            rows = {key: [] for key in out}
            for k in found.classes:
                target = torch.full((len(x),), k, dtype=torch.long)
                logits = lambda pattern, ratio: model(blend_patterns(x, pattern.expand_as(x), ratio))
                held = logits(found.patterns[k], 0.1)
                rows["held"].append(float(F.cross_entropy(held, target)))
                rows["half"].append(float(F.cross_entropy(logits(found.patterns[k], 0.05), target)))
                rows["cross"].append(float(F.cross_entropy(logits(final[k], 0.1), target)))
                others, hit = clean != k, held.argmax(1) == k
                rows["flip"].append(float(hit[others].float().mean()) if others.any() else 1.0)
                a, b = found.patterns[k].flatten(), final[k].flatten()
                rows["cos"].append(float(F.cosine_similarity(a - a.mean(), b - b.mean(), dim=0)))
            for key in out:
                out[key].append([round(v, 4) for v in rows[key]])
    for key in ("held", "half", "cross"):
        out[f"{key}_index"] = [[round(v, 2) for v in ClassPatterns(list(range(len(losses))), torch.zeros(0),
                                                                     losses).anomaly_index()]
                               for losses in out[key]]
    return out


def source_flip_statistics(trainer, versions: list, batches: int = 8) -> dict:
    """Seventeenth round (H19): per version (oldest first, the model last) and class k, the share of the
    fitted search G's samples of each source class j != k (the version's clean answer) that k's own blend
    pattern (ratio 0.1) sends to k: a trigger overrides the content, so it should flip every source alike,
    where a naturally easy class is nearer to some sources than to others. `flips[v][k][j]` (None: no
    sample of j), and per class the lowest source's share (`min`) and the share over all sources (`all`)."""
    founds, x = searched_versions(trainer, batches)
    out: dict = {"flips": [], "min": [], "all": []}
    with torch.no_grad(), trainer.searches_in_fp32():
        for model, found in zip(versions, founds):
            model.eval()
            clean = model(x).argmax(1)
            flips, lows, alls = [], [], []
            for k in found.classes:
                hit = model(blend_patterns(x, found.patterns[k].expand_as(x), 0.1)).argmax(1) == k
                row = [round(float(hit[clean == j].float().mean()), 3) if j != k and bool((clean == j).any()) else None
                       for j in range(trainer.spec.num_classes)]
                flips.append(row)
                lows.append(min(v for v in row if v is not None))
                alls.append(round(float(hit[clean != k].float().mean()), 3))
            out["flips"].append(flips)
            out["min"].append(lows)
            out["all"].append(alls)
    return out


def mask_size_statistics(trainer, versions: list) -> dict:
    """Seventeenth round (H18): per version (oldest first, the model last) and class k, Neural Cleanse's
    smallest mask that sends the fitted search G's samples to k (the mask search's own settings), its
    mean over the image and success; with the anomaly index of the log mask means (small = anomalous)."""
    from defense.mask_search import invert_mask_trigger

    cfg, samples = trainer.recipe.get("mask_search"), fitted_samples(trainer)
    out: dict = {"mask_mean": [], "success": [], "index": [], "s": []}
    with trainer.searches_in_fp32():
        for model in versions:
            started = time.perf_counter()
            found = [invert_mask_trigger(model.eval(), samples, k, cfg.steps, cfg.lr, cfg.cost)
                     for k in range(trainer.spec.num_classes)]
            means = [t.mask_mean for t in found]
            out["mask_mean"].append([round(v, 5) for v in means])
            out["success"].append([round(t.success, 3) for t in found])
            out["index"].append([round(v, 2) for v in ClassPatterns(list(range(len(means))), torch.zeros(0),
                                                                     means).anomaly_index()])
            out["s"].append(round(time.perf_counter() - started, 1))
    return out


def candidate_report(path: Path) -> None:
    """Per run of a --candidates file: the true target (read by the experimenter only), the verdict's
    suspects, and per statistic the classes over 2 in at least 2 of the versions with the values."""
    from defense.dhbe.extensions.verdict import voted_suspects

    for line in path.read_text().splitlines():
        row = json.loads(line)
        c, target = row["candidates"], row["truth"]["target"]
        shown = sorted({*row["suspects"], *([target] if target is not None else [])})
        print(f"{row['case']:32s} target {target}  verdict {row['suspects']}")
        for key in ("held_index", "half_index", "cross_index", "flip", "cos"):
            named = voted_suspects(c[key], 2.0, 2) if key.endswith("index") else []
            values = "  ".join(f"{k}: " + "/".join(f"{v[k]:.2f}" for v in c[key]) for k in shown)
            print(f"    {key:12s} {str(named):10s} {values}")


def history(cases, rounds: list[int], steps: int, out: str) -> None:
    """The verdict's probe on earlier global models of the same run (what a server keeps)."""
    for case in cases:
        if case.kind == "central":
            continue
        folder = plant_history(case)
        for number in rounds:
            row = {"case": case.name, "truth": truth(case), "round": number,
                   **probe(round_model_file(folder, number), False, steps, ("blend0.1",))}
            print(case.name, row["truth"], number, row["blend0.1"]["top"], row["blend0.1"]["index"],
                  row["blend0.1"]["indices"], flush=True)
            with Path(out).open("a") as sink:
                sink.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from defense.cli import run_main

    run_main(lambda argv: main() or 0, "python -m benchmarks.verdict_probe")   # a bad --set value: one line, exit 2
