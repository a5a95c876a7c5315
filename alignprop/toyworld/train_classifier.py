"""Train the learned shape reward's CNN on rendered scenes (perturbed), and report its test accuracy.

python -m alignprop.toyworld.train_classifier --out assets/toyworld/classifier/shape_classifier.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignprop.toyworld import CLASSIFIER_FILE
from alignprop.toyworld.augment import perturb
from alignprop.toyworld.classifier import ShapeClassifier, save
from alignprop.toyworld.data import RunLog, cosine_schedule, rendered_dataset, set_threads
from alignprop.toyworld.world import SHAPES

TEST_SEED = 777  # scenes the classifier never trains on


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CLASSIFIER_FILE)
    parser.add_argument("--log", type=Path, default=Path("logs/toyworld/classifier/train_log.jsonl"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def labels_of(dataset) -> torch.Tensor:
    return torch.tensor([SHAPES.index(scene.shape) for scene in dataset.scenes])


@torch.no_grad()
def test_accuracy(model: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def train(args) -> None:
    set_threads(args.threads)
    log = RunLog(args.log)
    data = rendered_dataset(args.train_images, args.seed)
    labels = labels_of(data)
    test = rendered_dataset(1000, TEST_SEED)
    torch.manual_seed(args.seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = cosine_schedule(optimizer, args.steps, warmup_steps=50, final_fraction=0.02)
    generator = torch.Generator().manual_seed(args.seed)
    for step in (progress := tqdm(range(1, args.steps + 1), desc="classifier", mininterval=5)):
        indices = torch.randint(len(data), (args.batch_size,), generator=generator)
        loss = F.cross_entropy(model(perturb(data.images[indices], generator)), labels[indices])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            model.eval()
            accuracy = test_accuracy(model, test.images, labels_of(test))
            model.train()
            progress.set_postfix(loss=f"{loss.item():.3f}", test_accuracy=f"{accuracy:.3f}")
            log.write(step=step, loss=loss.item(), test_accuracy=accuracy)
    model.eval()
    accuracy = test_accuracy(model, test.images, labels_of(test))
    save(model, args.out, {"steps": args.steps, "seed": args.seed, "test_accuracy": accuracy})
    log.write(done=True, test_accuracy=accuracy, path=str(args.out))


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
