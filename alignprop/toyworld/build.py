"""Rebuild every shipped toy-world asset, in order, with the recipe the shipped files came from.

    python -m alignprop.toyworld.build [--threads 1]

1. the VAE (logs/toyworld/vae); 2. the UNet + text encoder from scratch, then a second stage on fresh
scenes that starts from the first (assets/toyworld/pipeline); 3. the learned reward's shape classifier
(assets/toyworld/classifier); 4. the prompt files of the train / held-out split (assets/toyworld/prompts);
5. the flow-matching edition, an SD3 pipeline on the same VAE and captions: from scratch, then three more stages on
fresh scenes, each starting from the last (assets/toyworld/flow_pipeline). The first two saw SD3's 256 zero T5 tokens
only; the last two a random number of them (1-256), so the model serves any `max_sequence_length`.
On a 2-core CPU shared with other work steps 1-4 took about an hour, step 5 about two (see
assets/toyworld/README.md); results match the shipped ones in accuracy, not bit for bit (thread counts and CPUs
change floating-point sums).
"""

from __future__ import annotations

import argparse

from alignprop.toyworld import (
    FLOW_PIPELINE_DIR,
    PIPELINE_DIR,
    splits,
    train_classifier,
    train_flow,
    train_unet,
    train_vae,
)

STAGE_2_SEED = 5  # fresh scenes and noise for the second UNet stage (and the flow model's)
# The flow model's stages after the first, each continuing from the last: train_flow arguments on top of its defaults.
FLOW_STAGES = (
    f"--seed {STAGE_2_SEED} --steps 2400 --padding 256 256",
    "--seed 7 --steps 4000",
    "--seed 11 --steps 2500 --batch-size 128",
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=None, help="torch CPU threads for every stage")
    args = parser.parse_args(argv)
    threads = ["--threads", args.threads] if args.threads else []
    train_vae.main(threads)
    train_unet.main(threads)
    stage_2_log = "logs/toyworld/unet_stage2/train_log.jsonl"
    train_unet.main([*threads, "--init", str(PIPELINE_DIR), "--seed", str(STAGE_2_SEED), "--log", stage_2_log])
    train_classifier.main(threads)
    splits.write_prompt_files()
    train_flow.main([*threads, "--padding", "256", "256"])
    for stage, arguments in enumerate(FLOW_STAGES, start=2):
        log = f"logs/toyworld/flow_stage{stage}/train_log.jsonl"
        train_flow.main([*threads, "--init", str(FLOW_PIPELINE_DIR), "--log", log, *arguments.split()])


if __name__ == "__main__":
    main()
