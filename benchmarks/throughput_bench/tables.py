"""The report as markdown tables, and the JSON and markdown files it is written to."""

from __future__ import annotations

import json
from typing import Any


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    env = report["environment"]
    where = env.get("gpu") or env["processor"]
    lines = [f"Device: {env['device']} ({where}); torch {env['torch']}, "
             f"{env['threads']} threads, CPU capability {env['cpu_capability']}; "
             f"dtype {report['options']['dtype']}, compile {report['options']['compile']}."]
    if "matmul_peak_gflops" in report:
        peaks = report["matmul_peak_gflops"]
        lines.append(f"Dense-matmul peak: fp32 {peaks['fp32']:,.0f} GFLOP/s, "
                     f"bf16 {peaks['bf16']:,.0f} GFLOP/s.")
    lines.append("")
    if report.get("results"):
        lines += markdown_table(
            ["shape (tokens)", "mode", "batch", "implementation", "params", "GFLOP/img",
             "images/s", "vs fastest peer", "GFLOP/s", "% of peak", "step memory MiB"],
            [[f"{r['shape']} ({r['tokens']})", r["mode"], str(r["batch_size"]), r["label"],
              f"{r['parameters']:,}", f"{r['flops_per_image'] / 1e9:.3f}",
              f"{r['images_per_s']:,.0f}",
              f"{r['vs_fastest_peer']:.2f}x" if r.get("vs_fastest_peer") else "-",
              f"{r['gflops_per_s']:,.1f}",
              f"{100 * r['fraction_of_peak']:.0f}%" if r["fraction_of_peak"] else "-",
              f"{r['step_memory_mib']:.0f}" if r["step_memory_mib"] is not None else "-"]
             for r in report["results"]])
    for s in report.get("skipped", []):
        lines.append(f"\nSkipped {s['impl']} ({s['shape']}, {s['mode']}): {s['reason']}")
    if report.get("pipeline"):
        lines += [""] + markdown_table(
            ["shape", "batch", "batch prep ms", "whole step ms", "share outside model"],
            [[p["shape"], str(p["batch_size"]), f"{p['batch_ms']:.2f}", f"{p['step_ms']:.2f}",
              f"{100 * p['share']:.1f}%"] for p in report["pipeline"]])
    if report.get("levers"):
        lines += [""] + markdown_table(
            ["shape", "mode", "change from the default path", "default images/s",
             "changed images/s", "ratio"],
            [[v["shape"], v["mode"], v["description"], f"{v['default_images_per_s']:,.0f}",
              f"{v['changed_images_per_s']:,.0f}", f"{v['ratio']:.2f}x"]
             for v in report["levers"]])
    if report.get("kv_scaling"):
        lines += [""] + markdown_table(
            ["mode", "tokens (px)", "batch", "attention", "images/s", "vs MHA", "GFLOP/img",
             "step memory MiB", "K/V activations per image"],
            [[s["mode"], f"{s['tokens']} ({s['image_size']})", str(s["batch_size"]),
              f"{s['attention']} ({s['kv_heads']} K/V)", f"{s['images_per_s']:,.1f}",
              f"{s['vs_mha']:.2f}x", f"{s['flops_per_image'] / 1e9:.2f}",
              "-" if s["step_memory_mib"] is None else f"{s['step_memory_mib']:,.0f}",
              f"{s['kv_bytes_per_image'] / 2**10:,.0f} KiB"] for s in report["kv_scaling"]])
    if report.get("scaling"):
        lines += [""] + markdown_table(
            ["mode", "attention", "batch", "image", "tokens", "images/s"],
            [[s["mode"], s["attention"], str(s["batch_size"]), str(s["image_size"]),
              str(s["tokens"]), f"{s['images_per_s']:,.0f}"] for s in report["scaling"]])
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: str | None, md_path: str | None) -> None:
    from vit_mqa.checkpoint import atomic_write_text

    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    if md_path:
        atomic_write_text(md_path, markdown(report))
