"""The README's table of whole-update GPU measurements, from `bench_update.py`'s JSON results.

python -m benchmarks.update_table benchmarks/results/h200-update_*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The order the README reads best in: each one-GPU (int8) case after its bf16 counterpart.
CASE_ORDER = ("sdxl_lora_1024_k1", "sdxl_24gb", "flux_lora_512_k1", "flux_24gb", "sd35_full_512")
HEADER = (
    "| case | what runs | denoiser / text encoders stored | trainable params | resident before updates | peak "
    "| memory cap | cuDNN attention | s / update |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def row(result: dict) -> str:
    if "out_of_memory" in result:
        return f"| {result['case']} | out of memory under a {result['memory_cap_gib']} GiB cap | | | | | | | |"
    denoiser, text_encoders = (mode if mode != "none" else "bf16" for mode in result["quantize"])
    if result["finetune"] == "full":
        denoiser = "fp32 (trained)"
    cap = "none" if result["memory_cap_gib"] is None else f"{result['memory_cap_gib']:.0f} GiB"
    return (
        f"| {result['case']} | {result['description']} | {denoiser} / {text_encoders} "
        f"| {result['trainable_parameters'] / 1e6:,.1f} M | {result['resident_gib_before_updates']:.2f} GiB "
        f"| {result['peak_gib']:.2f} GiB | {cap} | {'on' if result.get('cudnn_sdp', True) else 'off'} "
        f"| {result['seconds_per_update']:.2f} |"
    )


def table(paths: list[Path]) -> str:
    results = [json.loads(path.read_text()) for path in paths]
    results.sort(key=lambda result: CASE_ORDER.index(result["case"]) if result["case"] in CASE_ORDER else 99)
    return "\n".join([HEADER, *map(row, results)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="bench_update --json files")
    print(table(parser.parse_args(argv).results))


if __name__ == "__main__":
    main()
