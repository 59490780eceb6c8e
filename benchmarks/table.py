"""The Markdown table of a benchmark run (``table.md``): the headline ratios against their
targets, then one section per benchmark. Reads ``results.json``'s dict; measures nothing."""

from __future__ import annotations

from benchmarks.common import fmt_bytes, fmt_s
from benchmarks.config import TARGETS


def status(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "met" if ok else "MISSED"


def _spread(t: dict) -> str:
    """Median and the range of the timed repeats."""
    times = t["times_s"]
    if len(times) < 2:
        return fmt_s(t["median_s"])
    return f"{fmt_s(t['median_s'])} ({fmt_s(min(times))}-{fmt_s(max(times))}, {len(times)}x)"


def _ratio(value: float | None) -> str:
    return "- (not installed)" if value is None else f"{value:.2f}"


def _meta(rows: dict) -> list[str]:
    lines = ["", "## 1. Meta re-weighting step vs plain step (MNIST-5k)", "",
             "| model | batch | exact step | first-order step | plain step | exact / plain | "
             "first-order / plain | compile exact / first-order / plain |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['batch']} | {_spread(r['meta_step'])} | {_spread(r['first_order_step'])} | "
            f"{_spread(r['plain_step'])} | {r['ratio']:.2f} | {r['first_order_ratio']:.2f} | "
            f"{fmt_s(r['meta_step']['compile_s'])} / {fmt_s(r['first_order_step']['compile_s'])} / "
            f"{fmt_s(r['plain_step']['compile_s'])} |")
    return lines


def _features(f: dict) -> list[str]:
    lp = f["loop"]
    return [
        "", f"## 2-3. Features (LeNet-5, N={f['n']}, K={f['snapshots']} snapshots)", "",
        "| what | time | compile | feature dim |", "|---|---|---|---|",
        f"| RBC (forward + rbc_features) | {_spread(f['rbc']['time'])} | "
        f"{fmt_s(f['rbc']['time']['compile_s'])} | {f['rbc']['feature_dim']} |",
        f"| GBC (gbc_features, 5 layers, chunk {f['gbc']['chunk_size']}) | "
        f"{_spread(f['gbc']['time'])} | {fmt_s(f['gbc']['time']['compile_s'])} | "
        f"{f['gbc']['feature_dim']} |",
        *([f"| GBC, strategy=\"patches\", chunk {f['gbc_patches']['chunk_size']} | "
           f"{_spread(f['gbc_patches']['time'])} | {fmt_s(f['gbc_patches']['time']['compile_s'])} | "
           f"{f['gbc']['feature_dim']} (max abs difference {f['gbc_patches']['max_abs_diff']:.1e}) |"]
          if "gbc_patches" in f else []),
        "", f"GBC vs reference loop (1 snapshot, N={f['n']}): {lp['note']}.", "",
        "| what | time for N | speedup of ours |", "|---|---|---|",
        f"| reference loop (jitted single-example grad, extrapolated) | {fmt_s(lp['loop_total_s'])} | - |",
        f"| ours: gbc_features | {fmt_s(lp['ours_gbc']['median_s'])} | {lp['speedup_gbc']:.1f}x |",
        f"| ours: per_example_grads, all parameters | "
        f"{fmt_s(lp['ours_per_example_grads_all_params']['median_s'])} | "
        f"{lp['speedup_per_example_grads']:.1f}x |",
        "", f"Loop rows agree with ours: max relative difference {lp['relative_diff_vs_ours']:.1e}."]


def _kmeans_rows(k: dict) -> list[str]:
    lines = ["", f"N={k['n']}, D={k['dim']}, M={k['clusters']}: {k['iterations']} iterations "
             f"(our plain Lloyd loop's count to converge at its tol), {k['repeats']} repeat(s); "
             f"Elkan assignments identical to Lloyd's: {k['elkan_equals_lloyd']}; "
             f"ours (Elkan) / faiss {_ratio(k['ratio_faiss'])}, / scikit-learn "
             f"{_ratio(k['ratio_sklearn'])}, "
             f"Elkan / Lloyd {k['elkan_over_lloyd']:.2f}.", "",
             "| method | time | per iteration | iterations run | compile | Eq. 9 (S2 centroids, "
             "own partition) | Eq. 9 (reassigned) |", "|---|---|---|---|---|---|---|"]
    for name in [m for m in ("ours_elkan", "ours_lloyd", "faiss", "sklearn") if m in k["times"]]:
        t, o = k["times"][name], k["objectives"][name]
        lines.append(f"| {name} | {_spread(t)} | {fmt_s(k['per_iteration_s'][name])} | "
                     f"{k['iterations_run'][name]} | {fmt_s(t['compile_s'])} | "
                     f"{o['partition']:.1f} | {o['reassigned']:.1f} |")
    return lines


def _kmeans(k: dict) -> list[str]:
    lines = ["", "## 4. K-means against faiss and scikit-learn"] + _kmeans_rows(k)
    if k.get("large"):
        lines += _kmeans_rows(k["large"])
    kp = k.get("ours_kmeanspp_seeding")
    if kp:
        lines += ["", f"Ours with its own k-means++ seeding instead of the shared init: "
                  f"{fmt_s(kp['median_s'])}."]
    return lines + ["", f"Setup: {k['setup']}.", "", f"Objective: {k['objective_definition']}."]


def _scaling(s: dict) -> list[str]:
    lines = ["", "## 5. Scaling in N", "",
             "| function | N | time | per iteration | compile | extra memory, steady call | extra "
             "memory, first call (incl. compile) | output | first-call extra - output |",
             "|---|---|---|---|---|---|---|---|---|"]
    for what, rows in (("kmeans", s["kmeans"]), ("gbc", s["gbc"])):
        for r in rows:
            if "error" in r:
                lines.append(f"| {what} | ? | error | | | | | | |")
                continue
            name = ("weighted_spherical_kmeans" if what == "kmeans"
                    else f"gbc_features (D={r['feature_dim']})")
            per_iter = fmt_s(r["time_per_iter_s"]) if what == "kmeans" else "-"
            lines.append(f"| {name} | {r['n']} | {fmt_s(r['time_s'])} | {per_iter} | "
                         f"{fmt_s(r['compile_s'])} | {fmt_bytes(r['call_extra_bytes'])} | "
                         f"{fmt_bytes(r['first_call_extra_bytes'])} | {fmt_bytes(r['output_bytes'])} | "
                         f"{fmt_bytes(r['first_call_extra_bytes'] - r['output_bytes'])} |")
    ks, gs = s["kmeans_loglog_slope"], s["gbc_loglog_slope"]
    return lines + [
        "", f"log-log slope of time vs N (1 = linear): k-means per iteration "
        f"{'-' if ks is None else f'{ks:.2f}'}, GBC {'-' if gs is None else f'{gs:.2f}'}.",
        f"Memory: {s['memory_method']}. GBC model: {s['gbc_model']}. K-means: {s['kmeans_setup']}."]


def _throughput(t: dict) -> list[str]:
    lines = ["", "## 6. per_example_grads throughput", "",
             "| model | input | N | strategy | chunk | examples/s | compile |",
             "|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        lines.append(f"| {r['model']} | {r['input']} | {r['n']} | {r.get('strategy', 'vmap')} | "
                     f"{r['chunk_size']} | {r['examples_per_s']:.1f} | {fmt_s(r['compile_s'])} |")
    v = t.get("versus_batched")
    if v:
        lines += ["", f"Batched forward + backward of the same {v['n']} examples in batches of "
                  f"{v['batched'].get('batch_size', v['n'])}: {v['batched']['examples_per_s']:.0f} "
                  f"examples/s; per-example ({v.get('best_strategy', 'vmap')}, chunk "
                  f"{v['best_chunk_size']}) / batched = {v['ratio']:.2f} ({v['definition']})."]
        if "output_share" in v:
            lines += ["", f"Of the best per-example call's time, {v['output_share']:.0%} is the "
                      f"allocation of its fresh {fmt_bytes(v['output']['bytes'])} output alone "
                      f"(zero-filled, timed in the same rounds); without it the ratio would be "
                      f"{v['ratio_without_output']:.2f}."]
    return lines


def render_table(results: dict) -> str:
    d, m = results["details"], results["machine"]
    lines = [f"# pivotal benchmarks ({results['mode']})", "",
             f"Machine: {m['cpu_count']} CPUs ({m.get('cpu', 'model not recorded')}), {m['platform']}, jax {m['jax_version']} "
             f"({m['jax_backend']}), load average at start {m['load_avg_start']}. "
             f"Command: `{results['command']}`. Wall time {results['wall_s']:.0f} s.",
             "", "## Headline ratios", "", "| metric | value | target | status |",
             "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        v = results.get(key)
        lines.append(f"| `{key}` | {'-' if v is None else f'{v:.2f}'} | {op} {target:g} | "
                     f"{status(key, v)} |")
    sections = {"meta_step": _meta, "features": _features, "kmeans": _kmeans,
                "scaling": _scaling, "throughput": _throughput}
    for name, render in sections.items():
        if name in d:
            lines += render(d[name])
    return "\n".join(lines) + "\n"
